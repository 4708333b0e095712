"""stablemax_perpgrad: StableMax cross-entropy against a written-out formula (value and gradient),
s(x) continuous and C^1 at 0, no Softmax Collapse where softmax's float32 gradient is exactly 0,
and ⊥Grad's projection (orthogonal to the weights, norm kept) through the Trainer."""

import functools

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk.interfaces import Callback


def s_slow(x):
    return x + 1 if x >= 0 else 1 / (1 - x)


def slow(z, y):
    rows = []
    for i in range(z.shape[0]):
        total = sum(s_slow(z[i, k]) for k in range(z.shape[1]))
        rows.append(-torch.log(s_slow(z[i, y[i]]) / total))
    return torch.stack(rows)


def run(obj, z, y):
    return obj(sdk.Views(logits=z), sdk.Batch(targets=y))


def test_matches_formula_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(7, 5, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    got = run(sdk.create("objective", "stablemax_perpgrad"), z, y)
    want = slow(z, y)
    assert torch.allclose(got.per_sample, want, rtol=1e-12)
    assert got.value.item() == pytest.approx(want.mean().item(), rel=1e-12)
    g1, g2 = (torch.autograd.grad(t.sum(), z)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)
    # soft labels are the q-weighted sum of the per-class losses
    q = torch.softmax(torch.randn(7, 5, generator=g, dtype=torch.float64), 1)
    soft = run(sdk.create("objective", "stablemax_perpgrad"), z, q).per_sample
    per_class = torch.stack([slow(z, torch.full((7,), k)) for k in range(5)], 1)
    assert torch.allclose(soft, (q * per_class).sum(1), rtol=1e-12)


def test_s_is_c1_at_zero_and_not_softmax():
    from plugins.classification.stablemax_perpgrad import stablemax_s

    x = torch.tensor([-1e-7, 0.0, 1e-7, -3.0, 2.0], dtype=torch.float64, requires_grad=True)
    s = stablemax_s(x)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.allclose(s[:3], torch.ones(3, dtype=torch.float64), atol=2e-7)
    assert torch.allclose(grad[:3], torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert s[3].item() == pytest.approx(0.25) and s[4].item() == pytest.approx(3.0)
    assert grad[3].item() == pytest.approx(1 / 16) and grad[4].item() == pytest.approx(1.0)


def test_no_softmax_collapse_where_softmax_gradient_is_zero():
    # a logit margin of 110 in float32: softmax's loss and gradient are exactly 0, StableMax's not
    z = torch.tensor([[110.0, 0.0, 0.0], [1.0, 0.0, 0.5]], requires_grad=True)
    y = torch.tensor([0, 0])
    (g_soft,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="none")[0], z)
    assert g_soft.abs().sum().item() == 0
    loss = run(sdk.create("objective", "stablemax_perpgrad"), z, y)
    (g_stable,) = torch.autograd.grad(loss.per_sample[0], z)
    assert (g_stable[0] != 0).all() and loss.per_sample[0].item() > 0
    assert loss.logs["softmax_collapse"].item() == 0.5  # the first sample has collapsed


def test_perpendicular_gradient_keeps_the_norm_and_removes_the_weight_direction():
    from plugins.classification.stablemax_perpgrad import orthogonal_gradients

    g = torch.Generator().manual_seed(1)
    w = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    grads = [wi * 0.7 + torch.randn(wi.shape, generator=g, dtype=torch.float64) for wi in w]
    out = orthogonal_gradients(w, grads)
    for wi, gi, oi in zip(w, grads, out):
        slow_perp = gi - (wi * gi).sum() / (wi * wi).sum() * wi
        assert torch.allclose(oi, slow_perp * gi.norm() / slow_perp.norm(), rtol=1e-12)
        assert abs((oi * wi).sum().item()) <= 1e-12 * oi.norm().item() * wi.norm().item()
    plain = orthogonal_gradients(w, grads, rescale=False)
    assert torch.allclose(plain[1], grads[1] - (w[1] @ grads[1]) / (w[1] @ w[1]) * w[1], rtol=1e-12)
    glob = orthogonal_gradients(w, grads, scope="global")
    flat_w, flat_o = torch.cat([t.flatten() for t in w]), torch.cat([t.flatten() for t in glob])
    assert abs(flat_w @ flat_o) <= 1e-12 * flat_w.norm() * flat_o.norm()
    assert abs((w[1] * glob[1]).sum()) > 1e-3  # global, not per tensor


def test_callback_projects_the_trainers_gradients():
    # probes before and after the callback (callbacks run in order): with the default
    # rescale=True every projected gradient keeps the norm of the gradient it replaces
    seen, before = [], []

    class Probe(Callback):
        def __init__(self, into):
            self.into = into

        def before_optimizer_step(self, state):
            self.into.append([(p.detach().clone(), p.grad.clone()) for p in state.model.parameters()])

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    sdk.Trainer(model, sdk.create("objective", "stablemax_perpgrad"),
                functools.partial(torch.optim.SGD, lr=0.1),
                callbacks=[Probe(before), sdk.create("callback", "stablemax_perpgrad"), Probe(seen)],
                max_steps=3, progress=False, device="cpu").fit(loader)
    assert len(seen) == len(before) == 3
    for (p, grad), (_, raw) in zip(seen[-1], before[-1]):
        assert abs((p * grad).sum().item()) <= 1e-5 * p.norm().item() * grad.norm().item()
        assert grad.norm().item() == pytest.approx(raw.norm().item(), rel=1e-5)
        # the projection alone would shorten it: the parameter direction is a real share of it
        perp = raw - (p * raw).sum() / (p * p).sum() * p
        assert perp.norm().item() < 0.999 * raw.norm().item()


def test_errors():
    with pytest.raises(sdk.ConfigError, match="scope"):
        sdk.create("callback", "stablemax_perpgrad", scope="layer")
    with pytest.raises(sdk.ShapeError, match=r"stablemax_perpgrad: Batch.targets"):
        run(sdk.create("objective", "stablemax_perpgrad"), torch.zeros(2, 3), torch.zeros(2, 4))


def test_fused_class_id_path_equals_the_autograd_graph():
    # the closed-form autograd function of class ids against autograd through log_stablemax
    # (the soft-label path): gradcheck in float64, then float32 / bf16 parity on both sides of 0
    from plugins.classification.stablemax_perpgrad import _StableMaxNLL, log_stablemax

    g = torch.Generator().manual_seed(3)
    z = (2 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.autograd.gradcheck(lambda z: _StableMaxNLL.apply(z, y), (z,))
    z = torch.cat([3 * torch.randn(63, 40, generator=g), torch.full((1, 40), -1e6)])
    z[1, :] = 1e6  # large logits: no cancellation between the two branches of s
    y = torch.randint(0, 40, (64,), generator=g)
    w = torch.rand(64, generator=g)  # a non-uniform upstream gradient
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        zd = z.to(dtype).requires_grad_()
        fused = run(sdk.create("objective", "stablemax_perpgrad"), zd, y).per_sample
        graph = -log_stablemax(zd).gather(1, y[:, None]).squeeze(1)
        assert fused.dtype == graph.dtype == torch.float32
        assert torch.allclose(fused, graph, rtol=rtol, atol=1e-6)
        g1, g2 = (torch.autograd.grad((w * t).sum(), zd)[0] for t in (fused, graph))
        assert g1.dtype == dtype
        assert torch.allclose(g1.float(), g2.float(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                              atol=1e-7)
    with pytest.raises(RuntimeError, match="does not require grad|once"):  # no silent 2nd order
        zz = z[:4, :5].double().requires_grad_()
        (gz,) = torch.autograd.grad(_StableMaxNLL.apply(zz, y[:4] % 5).sum(), zz, create_graph=True)
        torch.autograd.grad(gz.sum(), zz)
