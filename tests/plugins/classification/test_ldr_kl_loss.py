"""ldr_kl_loss against a written-out formula (value and gradient), its lambda limits
(Crammer-Singer at 0, the mean margin at infinity) and its robustness to label noise on digits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdk


def slow(o, y, lam, c, normalize=True):
    rows = []
    for i in range(o.shape[0]):
        k = o.shape[1]
        f = [torch.log(1 + torch.exp(o[i, j])) for j in range(k)] if normalize else [o[i, j] for j in range(k)]
        if normalize:
            mean = sum(f) / k
            f = [v / mean for v in f]
        terms = [torch.exp(((c if j != y[i] else 0.0) + f[j] - f[y[i]]) / lam) for j in range(k)]
        rows.append(lam * torch.log(sum(terms) / k))
    return torch.stack(rows)


def run(obj, o, y):
    return obj(sdk.Views(logits=o), sdk.Batch(targets=y)).per_sample


@pytest.mark.parametrize(("lam", "c", "normalize"), [(10.0, 0.1, True), (0.5, 1.0, True), (2.0, 1.0, False)])
def test_matches_formula(lam, c, normalize):
    g = torch.Generator().manual_seed(0)
    o = (2 * torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    obj = sdk.create("objective", "ldr_kl_loss", lam=lam, margin=c, normalize=normalize)
    got, want = run(obj, o, y), slow(o, y, lam, c, normalize)
    assert torch.allclose(got, want, rtol=1e-10)
    g1, g2 = (torch.autograd.grad(t.sum(), o)[0] for t in (got, want))
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-12)


def test_lambda_limits():
    g = torch.Generator().manual_seed(1)
    o, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.tensor([0, 5, 2, 3, 3])
    gaps = 1.0 * (1 - F.one_hot(y, 6)) + o - o.gather(1, y[:, None])
    small = run(sdk.create("objective", "ldr_kl_loss", lam=1e-4, margin=1.0, normalize=False), o, y)
    assert torch.allclose(small, gaps.max(1).values, atol=1e-3)  # Crammer-Singer
    large = run(sdk.create("objective", "ldr_kl_loss", lam=1e6, margin=1.0, normalize=False), o, y)
    assert torch.allclose(large, gaps.mean(1), atol=1e-5)  # the mean margin
    assert sdk.create("objective", "ldr_kl_loss").lam == 10.0
    assert sdk.create("objective", "ldr_kl_loss").margin == 0.1


def _accuracy(loss, x, y, labels, train, test, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        loss(net(x[train]), labels[train]).backward()
        opt.step()
    with torch.no_grad():
        return float((net(x[test]).argmax(1).numpy() == y[test]).mean())


def test_more_accurate_than_cross_entropy_under_40_percent_symmetric_label_noise():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    ldr = sdk.create("objective", "ldr_kl_loss")
    gaps = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        train, test = order[:1200], order[1200:]
        noisy = y.copy()
        flip = rng.random(len(y)) < 0.4  # 40% of the labels replaced by another class
        noisy[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
        labels = torch.tensor(noisy)

        data = (x, y, labels, train, test, seed)
        robust = _accuracy(lambda z, t: ldr(sdk.Views(logits=z), sdk.Batch(targets=t)).value, *data)
        plain = _accuracy(F.cross_entropy, *data)
        gaps.append(robust - plain)
    assert min(gaps) > 0.05, gaps


def test_errors():
    with pytest.raises(sdk.ShapeError, match=r"ldr_kl_loss: Batch.targets must lie in \[0, 3\)"):
        sdk.create("objective", "ldr_kl_loss")(sdk.Views(logits=torch.zeros(2, 3)),
                                               sdk.Batch(targets=torch.tensor([0, 5])))
    with pytest.raises(sdk.ConfigError, match="lam must be"):
        sdk.create("objective", "ldr_kl_loss", lam=0.0)
    assert math.isfinite(run(sdk.create("objective", "ldr_kl_loss"), torch.full((2, 3), -1e4),
                             torch.tensor([0, 1])).sum().item())


def graph_ldr_kl(o, y, lam, c, normalize):
    # the same loss through autograd: normalised scores, then logaddexp of the off-target lse
    f = F.softplus(o) if normalize else o
    if normalize:
        f = f / f.mean(-1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)
    f = f / lam
    f_y = f.gather(1, y[:, None]).squeeze(1)
    others = torch.logsumexp(f.scatter(1, y[:, None], float("-inf")), 1)
    return lam * (torch.logaddexp(others + c / lam, f_y) - f_y - math.log(o.shape[1]))


@pytest.mark.parametrize(("lam", "c", "normalize"), [(10.0, 0.1, True), (0.05, 1.0, True), (2.0, 0.5, False)])
def test_closed_form_gradient_equals_the_autograd_graph(lam, c, normalize):
    from plugins.classification.ldr_kl_loss import _LDRKL

    g = torch.Generator().manual_seed(5)
    o = (2 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.autograd.gradcheck(lambda o: _LDRKL.apply(o, y, lam, c, normalize), (o,))
    o = 3 * torch.randn(64, 50, generator=g)
    o[1] = -200.0  # softplus underflows to 0 for the whole row: the mean is clamped
    y, w = torch.randint(0, 50, (64,), generator=g), torch.rand(64, generator=g)
    obj = sdk.create("objective", "ldr_kl_loss", lam=lam, margin=c, normalize=normalize)
    for dtype in (torch.float32, torch.bfloat16):
        od = o.to(dtype).requires_grad_()
        got, want = run(obj, od, y), graph_ldr_kl(od.float(), y, lam, c, normalize)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        g1, g2 = (torch.autograd.grad((w * t).sum(), od)[0] for t in (got, want))
        assert g1.dtype == dtype and torch.isfinite(g1).all()
        assert torch.allclose(g1.float(), g2.float(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                              atol=1e-6)
