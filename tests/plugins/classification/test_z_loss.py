"""z_loss against a written-out formula (value and gradient) and its shift and scale invariance."""

import math

import pytest
import torch

import sdk


def slow(o, y, a, b):
    rows = []
    for i in range(o.shape[0]):
        k = o.shape[1]
        mu = sum(o[i, j] for j in range(k)) / k
        sigma = torch.sqrt(sum((o[i, j] - mu) ** 2 for j in range(k)) / k)
        z = (o[i, y[i]] - mu) / sigma
        rows.append(torch.log(1 + torch.exp(a * (b - z))) / a)
    return torch.stack(rows)


def run(obj, o, y):
    return obj(sdk.Views(logits=o), sdk.Batch(targets=y)).per_sample


@pytest.mark.parametrize(("a", "b"), [(1.0, 0.0), (0.1, 10.0), (3.0, 1.5)])
def test_matches_formula(a, b):
    g = torch.Generator().manual_seed(0)
    o = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    obj = sdk.create("objective", "z_loss", a=a, b=b)
    got, want = run(obj, o, y), slow(o, y, a, b)
    assert torch.allclose(got, want, rtol=1e-9)
    g1, g2 = (torch.autograd.grad(t.sum(), o)[0] for t in (got, want))
    assert torch.allclose(g1, g2, rtol=1e-7, atol=1e-12)


def test_invariant_to_shift_and_positive_scale_of_the_logits():
    g = torch.Generator().manual_seed(1)
    o, y = torch.randn(8, 7, generator=g, dtype=torch.float64), torch.arange(8) % 7
    obj = sdk.create("objective", "z_loss", a=0.5, b=2.0)
    base = run(obj, o, y)
    for shift, scale in ((5.0, 1.0), (-3.0, 0.01), (0.0, 250.0), (1e3, 7.0)):
        assert torch.allclose(run(obj, scale * o + shift, y), base, rtol=1e-9)
    assert not torch.allclose(run(obj, -o, y), base)  # a negative scale is no symmetry
    # cross-entropy has neither invariance to scale: z_loss's value is not CE's
    assert not torch.allclose(base, torch.nn.functional.cross_entropy(o, y, reduction="none"))


def test_analytic_extremes_and_equal_logits():
    # one-hot logits over K classes: z_y = sqrt(K - 1), z_other = -1 / sqrt(K - 1)
    o, k = torch.eye(5, dtype=torch.float64)[:2], 5
    loss = run(sdk.create("objective", "z_loss"), o, torch.tensor([0, 3]))
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-math.sqrt(k - 1))), rel=1e-9)
    assert loss[1].item() == pytest.approx(math.log1p(math.exp(1 / math.sqrt(k - 1))), rel=1e-9)
    flat = torch.zeros(2, 3, requires_grad=True)  # sigma = 0: z = 0, finite gradient
    value = sdk.create("objective", "z_loss")(sdk.Views(logits=flat), sdk.Batch(targets=torch.tensor([0, 1]))).value
    value.backward()
    assert value.item() == pytest.approx(math.log(2)) and torch.isfinite(flat.grad).all()


def test_errors():
    with pytest.raises(sdk.ShapeError, match=r"z_loss: Batch.targets must be class ids \[2\]"):
        sdk.create("objective", "z_loss")(sdk.Views(logits=torch.zeros(2, 3)),
                                          sdk.Batch(targets=torch.full((2, 3), 1 / 3)))
    with pytest.raises(sdk.ConfigError, match="a must be"):
        sdk.create("objective", "z_loss", a=0.0)


def graph_target_z(o, y):
    # the same z_y through autograd's var_mean / clamp / sqrt graph
    var, mu = torch.var_mean(o, -1, correction=0)
    sigma = var.clamp_min(torch.finfo(o.dtype).tiny).sqrt()
    return (o.gather(1, y[:, None]).squeeze(1) - mu) / (sigma + 1e-12)


def test_closed_form_gradient_equals_the_autograd_graph():
    from plugins.classification.z_loss import _TargetZ

    g = torch.Generator().manual_seed(2)
    o = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.autograd.gradcheck(lambda o: _TargetZ.apply(o, y), (o,))
    o = torch.randn(64, 50, generator=g)
    o[1] += 1e3  # a large shift: no cancellation against the mean
    o[2] = 0.5  # equal logits: the variance is clamped, its term drops
    y, w = torch.randint(0, 50, (64,), generator=g), torch.rand(64, generator=g)
    obj = sdk.create("objective", "z_loss", a=0.5, b=2.0)
    for dtype in (torch.float32, torch.bfloat16):
        od = o.to(dtype).requires_grad_()
        got = run(obj, od, y)
        want = torch.nn.functional.softplus(0.5 * (2.0 - graph_target_z(od.float(), y))) / 0.5
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        g1, g2 = (torch.autograd.grad((w * t).sum(), od)[0] for t in (got, want))
        assert g1.dtype == dtype and torch.isfinite(g1).all()
        assert torch.allclose(g1.float(), g2.float(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                              atol=1e-6)
