"""gradient_reversal_disentangle: the loss is the attribute classifier's cross-entropy (value
equal to the plain classifier's, and to a per-sample loop), the features receive exactly
-lambda times that cross-entropy's gradient while the classifier receives it unchanged, and a
linear encoder trained on a task with the adversary hides a planted attribute from a fresh
probe that reads it easily without the adversary."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk import keys
from sdk.types import Batch, Views


def inputs(seed, b=9, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    return h, torch.randint(0, k, (b,), generator=g)


def make(**kw):
    return sdk.create("objective", "gradient_reversal_disentangle", **kw).double()


@pytest.mark.parametrize("lam", [1.0, 0.3, 0.0])
def test_identity_forward_and_minus_lambda_backward(lam):
    h, a = inputs(0)
    obj = make(feature_dim=5, num_attributes=3, hidden_dim=4, grl_lambda=lam)
    loss = obj(Views(embeddings=(h,)), Batch(extras={keys.ATTRIBUTE: a}))
    params = list(obj.classifier.parameters())
    plain = F.cross_entropy(obj.classifier(h), a, reduction="none").mean()
    assert torch.equal(loss.value, plain)  # the reversal layer is the identity forward
    g_h, *g_p = torch.autograd.grad(loss.value, [h, *params])
    want_h, *want_p = torch.autograd.grad(plain, [h, *params])
    assert torch.equal(g_h, -lam * want_h)
    assert want_h.abs().max() > 1e-3  # a real gradient
    for got, want in zip(g_p, want_p):
        assert torch.equal(got, want)  # the classifier descends its cross-entropy


def test_per_sample_loss_equals_the_loop_and_features_entry_wins():
    h, a = inputs(1)
    obj = make(feature_dim=5, num_attributes=3, hidden_dim=0)
    other = torch.zeros(9, 2, dtype=torch.float64)
    loss = obj(Views(embeddings=(other,), extras={keys.FEATURES: (h,)}), Batch(extras={keys.ATTRIBUTE: a}))
    w, bias = obj.classifier.weight.detach(), obj.classifier.bias.detach()
    want = []
    for i in range(9):
        s = [sum(w[k, j].item() * h[i, j].item() for j in range(5)) + bias[k].item() for k in range(3)]
        want.append(math.log(sum(math.exp(v) for v in s)) - s[int(a[i])])
    assert loss.per_sample.tolist() == pytest.approx(want, rel=1e-12)
    assert loss.value.item() == pytest.approx(sum(want) / 9, rel=1e-12)


def probe_accuracy(z, a):
    """A fresh logistic probe, full batch, on detached features."""
    probe = torch.nn.Linear(z.shape[1], 2)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(z), a)
        loss.backward()
        return loss
    opt.step(closure)
    return (probe(z).argmax(1) == a).float().mean().item()


def train(adversary: bool):
    g = torch.Generator().manual_seed(0)
    n = 512
    y, a = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 6, generator=g)
    x[:, 0] += 2 * (2 * y - 1)  # the task
    x[:, 1] += 2 * (2 * a - 1)  # the attribute, independent of the task
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(6, 3), torch.nn.Linear(3, 2)
    adv = sdk.create("objective", "gradient_reversal_disentangle", feature_dim=3, hidden_dim=16)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters(), *adv.parameters()], lr=0.03)
    for _ in range(150):
        z = enc(x)
        loss = F.cross_entropy(head(z), y)
        if adversary:
            loss = loss + adv(Views(embeddings=(z,)), Batch(extras={keys.ATTRIBUTE: a})).value
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = enc(x)
        task = (head(z).argmax(1) == y).float().mean().item()
    return task, probe_accuracy(z, a)


def test_the_adversary_hides_the_attribute_and_keeps_the_task():
    task_plain, leak_plain = train(adversary=False)
    task_adv, leak_adv = train(adversary=True)
    assert leak_plain > 0.9  # a linear encoder keeps the planted attribute
    assert leak_adv < 0.65  # behind the reversal layer it is removed (chance is 0.5)
    assert task_adv > 0.9 and task_plain > 0.9


def test_defaults():
    obj = sdk.create("objective", "gradient_reversal_disentangle")
    assert (obj.grl_lambda, obj.num_attributes, obj.feature_dim) == (1.0, 2, 128)


def test_bad_inputs_are_named():
    h, a = inputs(2)
    obj = make(feature_dim=5, num_attributes=3)
    with pytest.raises(sdk.RequirementError, match=r"'gradient_reversal_disentangle' needs Batch.extras\['attribute'\]"):
        obj(Views(embeddings=(h,)), Batch())
    with pytest.raises(sdk.ShapeError, match=r"features must be floating \[B, 5\].*\[9, 4\]"):
        obj(Views(embeddings=(h[:, :4],)), Batch(extras={keys.ATTRIBUTE: a}))
    with pytest.raises(sdk.ShapeError, match=r"extras\['attribute'\] must lie in \[0, 3\)"):
        obj(Views(embeddings=(h,)), Batch(extras={keys.ATTRIBUTE: a + 3}))
    with pytest.raises(sdk.ShapeError, match="8 ids for 9 feature rows"):
        obj(Views(embeddings=(h,)), Batch(extras={keys.ATTRIBUTE: a[:8]}))
    with pytest.raises(sdk.ConfigError, match="grl_lambda"):
        sdk.create("objective", "gradient_reversal_disentangle", grl_lambda=-1.0)
