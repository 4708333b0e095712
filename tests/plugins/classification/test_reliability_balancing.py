"""reliability_balancing against a written-out loop of the authors' training step (value and
gradient); reliability 1 keeps the classifier's distribution; the correction pulls toward the
nearest anchors' class; the trust schedule and the anchors are checkpointed."""

import math
from types import SimpleNamespace

import pytest
import torch

import sdk


def ent_conf(p):
    return 1 - sum(-p[c] * torch.log(p[c]) for c in range(len(p))) / math.log(len(p))


def slow_loss(obj, z, e, y, trust):
    b, c = z.shape
    k, d = obj.anchors.shape[1], e.shape[1]
    a = obj.anchors
    q = e @ obj.w_q + obj.b_q
    kk = e @ obj.w_k + obj.b_k
    v = e @ obj.w_v + obj.b_v
    nll, centers = [], []
    for i in range(b):
        p = torch.softmax(z[i] / obj.temperature, 0)
        dist = torch.stack([torch.stack([torch.sqrt(((e[i] - a[cc, j]) ** 2).sum()) for j in range(k)])
                            for cc in range(c)])
        w = torch.softmax(-dist.flatten() / obj.delta, 0).view(c, k)
        s = w.sum(1)
        scores = torch.softmax(torch.stack([q[i] @ kk[j] for j in range(b)]) / math.sqrt(c * k), 0)
        out = sum(scores[j] * v[j] for j in range(b)) @ obj.w_o + obj.b_o
        att = torch.softmax(out, 0).view(c, k).sum(1)
        cp, cg, ca = ent_conf(p), ent_conf(s), ent_conf(att)
        r = (cg * s + ca * att) / (cg + ca)
        p_t = (1 - trust) * p + trust * (cp * p + (1 - cp) * r)
        nll.append(-torch.log(p_t[y[i]]))
        centers.append(cp * dist[y[i]].min() / math.sqrt(d))
    flat = a.reshape(c, -1)
    mu = -sum(((flat[i] - flat[j]) ** 2).sum() for i in range(c) for j in range(c)) / math.sqrt(d) / k / k
    return torch.stack(nll).mean() + trust * (mu + torch.stack(centers).mean())


def make(**kw):
    obj = sdk.create("objective", "reliability_balancing", num_classes=3, embedding_dim=4, **kw).double()
    with torch.no_grad():  # anchors start at 0 in the code; spread them to test the geometry
        obj.anchors.copy_(torch.randn(obj.anchors.shape, generator=torch.Generator().manual_seed(9)))
    return obj


@pytest.mark.parametrize("trust", [1.0, 0.3])
def test_matches_loop_value_and_gradients(trust):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0])
    obj = make(trust=trust, num_anchors=2, temperature=0.7, delta=0.5)
    got = obj(sdk.Views(embeddings=(e,), logits=z), sdk.Batch(targets=y)).value
    want = slow_loss(obj, z, e, y, trust)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    leaves = [z, e, obj.anchors, obj.w_q, obj.w_o]
    for gg, wg in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert torch.allclose(gg, wg, rtol=1e-8, atol=1e-12)


def test_zero_trust_is_cross_entropy_and_full_confidence_keeps_the_prediction():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    e = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = make()(sdk.Views(embeddings=(e,), logits=z), sdk.Batch(targets=y))
    assert loss.value.item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-12)
    # reliability 1 (a one-hot prediction): the corrected distribution is the prediction itself
    confident = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64).expand(6, 3)
    full = make(trust=1.0)(sdk.Views(embeddings=(e,), logits=confident), sdk.Batch(targets=torch.zeros(6, dtype=torch.long)))
    assert full.logs["corrected_accuracy"].item() == 1.0


def test_uncertain_prediction_moves_to_the_nearest_anchors_class():
    obj = make(trust=1.0, delta=0.1)
    anchors = obj.anchors.detach()
    e = anchors[2, 0][None] + 0.01  # right at class 2's anchor
    z = torch.zeros(1, 3, dtype=torch.float64)  # the classifier cannot decide (confidence 0)
    with torch.no_grad():
        loss = obj(sdk.Views(embeddings=(e,), logits=z), sdk.Batch(targets=torch.tensor([2])))
        other = obj(sdk.Views(embeddings=(e,), logits=z), sdk.Batch(targets=torch.tensor([0])))
    assert loss.logs["corrected_accuracy"].item() == 1.0
    assert loss.value < other.value  # the corrected distribution favours the anchor's class


def test_trust_follows_the_steps_and_state_round_trips():
    obj = make(trust_steps=10)
    state = SimpleNamespace(step=4, trainer=None)
    obj.after_optimizer_step(state)
    assert obj.trust.item() == pytest.approx(0.4)
    obj.after_optimizer_step(SimpleNamespace(step=25, trainer=None))
    assert obj.trust.item() == 1.0
    fresh = sdk.create("objective", "reliability_balancing").double()
    fresh.load_state_dict(obj.state_dict())
    assert torch.equal(fresh.anchors, obj.anchors) and fresh.trust.item() == 1.0
    fixed = make(trust=0.5)
    fixed.after_optimizer_step(state)
    assert fixed.trust.item() == 0.5


def test_errors():
    obj = make()
    z, e = torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(sdk.ShapeError, match="reliability_balancing: the anchors are"):
        obj(sdk.Views(embeddings=(e,), logits=z), sdk.Batch(targets=torch.tensor([0, 1])))
    with pytest.raises(sdk.ShapeError, match="reliability_balancing: Batch.targets must be class ids"):
        obj(sdk.Views(embeddings=(e,), logits=z[:, :3]), sdk.Batch(targets=torch.zeros(2, 3)))
    with pytest.raises(sdk.ConfigError, match="trust"):
        sdk.create("objective", "reliability_balancing", trust=1.5)


def test_defaults_are_the_authors_code():
    # one anchor per class, T = 1, delta = 1 and unit loss weights (the ARBEx code's defaults)
    obj = make(trust=1.0)
    assert obj.anchors.shape[:2] == (3, 1)
    assert (obj.temperature, obj.delta) == (1.0, 1.0)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    e = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    got = obj(sdk.Views(embeddings=(e,), logits=z), sdk.Batch(targets=y)).value
    assert got.item() == pytest.approx(slow_loss(obj, z, e, y, 1.0).item(), rel=1e-10)
