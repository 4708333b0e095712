"""distill_vq: nearest-codeword product quantisation (straight-through) and ListNet distillation."""

import math

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.encoders.distill_vq import listnet_distillation
from sdk import keys


def test_quantised_embedding_is_the_nearest_codewords_slow_loop():
    enc = sdk.create("encoder", "distill_vq", in_dim=6, subvectors=3, bits=2)
    h = torch.randn(5, 6)
    z = enc(h)
    c = enc.head.codebooks.detach()
    for b in range(5):
        for m in range(3):
            sub = h[b, 2 * m:2 * m + 2]
            best = min(range(4), key=lambda k: float(((sub - c[m, k]) ** 2).sum()))
            torch.testing.assert_close(z[b, 2 * m:2 * m + 2], c[m, best])


def test_straight_through_gradient_is_the_soft_assignments():
    enc = sdk.create("encoder", "distill_vq", in_dim=4, subvectors=2, bits=3)
    h = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    (enc(h) * g).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    c = enc.head.codebooks.detach()
    soft = torch.softmax(-((h2.reshape(3, 2, 1, 2) - c[None]) ** 2).sum(-1), -1)
    ((torch.einsum("bmk,mkd->bmd", soft, c).reshape(3, 4)) * g).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)


def test_defaults():
    enc = sdk.create("encoder", "distill_vq")
    assert enc.out_dim == 64 and enc.head.codebooks.shape == (8, 256, 8)
    assert enc.head.codebooks.abs().max() <= 0.1
    obj = sdk.create("objective", "distill_vq")
    assert obj.temperature == 1.0 and obj.gather == "auto"


def slow_listnet(q, d, dq, t):
    total = 0.0
    for i in range(q.shape[0]):
        s_t = [float(q[i] @ d[j]) / t for j in range(d.shape[0])]
        s_s = [float(q[i] @ dq[j]) / t for j in range(d.shape[0])]
        zt = sum(math.exp(s) for s in s_t)
        zs = sum(math.exp(s) for s in s_s)
        total += -sum(math.exp(a) / zt * (b - math.log(zs)) for a, b in zip(s_t, s_s))
    return total / q.shape[0]


def test_loss_equals_a_slow_loop_and_is_the_teacher_entropy_when_lossless():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64)
    d = torch.randn(5, 3, generator=g, dtype=torch.float64)
    dq = d + 0.3 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    obj = sdk.create("objective", "distill_vq", temperature=0.7)
    got = listnet_distillation(q, d, dq, 0.7).mean()
    assert float(got) == pytest.approx(slow_listnet(q, d, dq, 0.7), rel=1e-5)
    p = (q @ d.T / 0.7).softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert float(listnet_distillation(q, d, d, 0.7).mean()) == pytest.approx(float(entropy), rel=1e-5)
    one_view = obj(sdk.Views(embeddings=(dq[:4],), extras={keys.FEATURES: (d[:4],)}),
                   sdk.Batch(index=torch.arange(4)))
    assert float(one_view.value) == pytest.approx(slow_listnet(d[:4], d[:4], dq[:4], 0.7), rel=1e-5)


def test_objective_uses_first_view_queries_and_last_view_documents():
    g = torch.Generator().manual_seed(1)
    q, d = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    dq = d + 0.2 * torch.randn(6, 4, generator=g)
    obj = sdk.create("objective", "distill_vq")
    loss = obj(sdk.Views(embeddings=(q, dq), extras={keys.FEATURES: (q, d)}),
               sdk.Batch(index=torch.arange(6)))
    assert float(loss.value) == pytest.approx(slow_listnet(q, d, dq, 1.0), rel=1e-4)


def test_distillation_beats_kmeans_pq_recall_on_digits():
    """Paper's claim: distilled codebooks retrieve the dense top-10 better than plain PQ."""
    torch.manual_seed(0)
    x = torch.tensor(load_digits().data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    docs, queries = x[perm[:1400]], x[perm[1400:]]

    def recall(enc):
        with torch.no_grad():
            dense = (queries @ docs.T).topk(10, -1).indices
            quant = (queries @ enc.head(docs).T).topk(10, -1).indices
        return float((dense[:, :, None] == quant[:, None, :]).any(-1).float().mean())

    enc = sdk.create("encoder", "distill_vq", in_dim=64, subvectors=8, bits=4)
    enc.head.fit_kmeans(docs, generator=g)
    plain = recall(enc)
    obj = sdk.create("objective", "distill_vq")
    opt = torch.optim.Adam(enc.head.parameters(), lr=1e-3)
    for _ in range(300):
        qi, di = torch.randint(0, 1400, (256,), generator=g), torch.randint(0, 1400, (256,), generator=g)
        views = sdk.Views(embeddings=(enc(docs[qi]), enc(docs[di])),
                          extras={keys.FEATURES: (docs[qi], docs[di])})
        loss = obj(views, sdk.Batch(index=torch.arange(256)))
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    distilled = recall(enc)
    assert distilled > plain + 0.02, (plain, distilled)


def test_errors():
    with pytest.raises(sdk.ConfigError, match="subvectors=5 must divide the embedding width 64"):
        sdk.create("encoder", "distill_vq", subvectors=5)
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        sdk.create("objective", "distill_vq", temperature=0.0)
    enc = sdk.create("encoder", "distill_vq", in_dim=8, subvectors=2, bits=2)
    with pytest.raises(sdk.ShapeError, match=r"encoder 'distill_vq': x must be a floating batch"):
        enc(torch.zeros(3, 9))
    with pytest.raises(sdk.ShapeError, match="k-means needs at least 4 rows"):
        enc.head.fit_kmeans(torch.zeros(3, 8))
    obj = sdk.create("objective", "distill_vq")
    with pytest.raises(sdk.ShapeError, match=r"objective 'distill_vq': Views.extras\['features\[0\]'\] must be floating \[4, 3\]"):
        obj(sdk.Views(embeddings=(torch.randn(4, 3),), extras={keys.FEATURES: (torch.randn(4, 2),)}),
            sdk.Batch(index=torch.arange(4)))


def test_teacher_scores_carry_no_gradient_and_queries_learn_through_the_student():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dq = (d.detach() + 0.3 * torch.randn(5, 4, generator=g, dtype=torch.float64)).requires_grad_()
    listnet_distillation(q, d, dq).mean().backward()
    assert d.grad is None or d.grad.abs().max() == 0
    p, s = (q @ d.T).softmax(-1).detach(), (q @ dq.T).softmax(-1).detach()
    expected = ((s - p) @ dq.detach()) / 5            # d/dq of mean_i CE(p_i, softmax(q_i dq^T))
    torch.testing.assert_close(q.grad, expected)
