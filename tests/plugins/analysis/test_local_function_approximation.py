"""local_function_approximation against exactly linear models (every explanation that is the
model's own linear part has zero loss), a plain loop over perturbations with one autograd call
each, the paper's reading of SmoothGrad as the gradient-matching optimum, and its no-free-lunch
ordering of vanilla gradients and SmoothGrad across neighbourhood widths."""

import math

import pytest
import torch

import sdk
from plugins.analysis.local_function_approximation import lfa_loss, perturb, responses


def linear_model(seed=0, d=5, c=3):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(c, d, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    return (lambda x: x @ a.T + b), a


def mlp(seed=1, d=5, c=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, c)).double()


def loss_of(model, x0, target, w, neighbourhood, loss, seed=0, **kw):
    z, x = perturb(x0, neighbourhood, generator=torch.Generator().manual_seed(seed), **kw)
    return lfa_loss(z, responses(model, x0, x, target, neighbourhood, loss), w, loss=loss)


@pytest.mark.parametrize("neighbourhood", ["gaussian", "binary", "uniform"])
def test_linear_model_own_explanation_has_zero_loss(neighbourhood):
    f, a = linear_model()
    x0 = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = torch.arange(7) % 3
    # the gradient for x0 + z; gradient x input for the multiplicative x0 * z and alpha x0
    w = a[target] if neighbourhood == "gaussian" else x0 * a[target]
    for loss in ("squared", "gradient_matching"):
        assert loss_of(f, x0, target, w, neighbourhood, loss).abs().max() < 1e-20
    if neighbourhood == "gaussian":       # a wrong explanation: ||delta||^2 exactly
        delta = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25], dtype=torch.float64)
        out = loss_of(f, x0, target, w + delta, neighbourhood, "gradient_matching")
        assert torch.allclose(out, torch.full((7,), float(delta.pow(2).sum()), dtype=torch.float64))
        # squared, best intercept: 1/2 E[(delta^T z)^2] = 1/2 sigma^2 ||delta||^2 (sigma = 0.1)
        sq = loss_of(f, x0, target, w + delta, neighbourhood, "squared")
        assert sq.mean().item() == pytest.approx(0.5 * 0.01 * float(delta.pow(2).sum()), rel=0.05)


def slow_losses(model, x0, target, z, x, w, neighbourhood):
    """Each perturbation on its own: f_t(x(z)) and d f_t(x(z)) / dz with z a leaf."""
    squared, matched = [], []
    for i in range(x0.shape[0]):
        values, errors = [], []
        for s in range(z.shape[1]):
            zi = z[i, s].clone().requires_grad_()
            xi = x0[i] + zi if neighbourhood == "gaussian" else x0[i] * zi   # uniform: z = alpha 1
            assert torch.equal(xi.detach(), x[i, s])
            out = model(xi[None])[0, int(target[i])]
            (grad,) = torch.autograd.grad(out, zi)
            values.append(float(out.detach()) - float(w[i] @ z[i, s]))
            errors.append(float((grad - w[i]).pow(2).sum()))
        b = sum(values) / len(values)
        squared.append(sum(0.5 * (v - b) ** 2 for v in values) / len(values))
        matched.append(sum(errors) / len(errors))
    return torch.tensor(squared, dtype=torch.float64), torch.tensor(matched, dtype=torch.float64)


@pytest.mark.parametrize("neighbourhood", ["gaussian", "binary", "uniform"])
def test_matches_slow_loop_for_an_mlp(neighbourhood):
    model = mlp()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    z, x = perturb(x0, neighbourhood, n_samples=12, sigma=0.5, low=0.2, generator=g)
    squared, matched = slow_losses(model, x0, target, z, x, w, neighbourhood)
    fast_sq = lfa_loss(z, responses(model, x0, x, target, neighbourhood, "squared"), w)
    fast_gm = lfa_loss(z, responses(model, x0, x, target, neighbourhood, "gradient_matching"), w,
                       loss="gradient_matching")
    torch.testing.assert_close(fast_sq, squared, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_gm, matched, rtol=1e-10, atol=1e-12)
    if neighbourhood == "uniform":
        assert torch.all((z[..., 0] >= 0.2) & (z[..., 0] <= 1) & (z == z[..., :1]).all(2))


def test_smoothgrad_is_the_gradient_matching_optimum_and_no_free_lunch():
    model = mlp(d=5)
    x0 = torch.randn(20, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = torch.zeros(20, dtype=torch.long)
    vg = responses(model, x0, x0[:, None], target, loss="gradient_matching")[:, 0]
    z, x = perturb(x0, "gaussian", n_samples=400, sigma=1.0, generator=torch.Generator().manual_seed(6))
    grads = responses(model, x0, x, target, "gaussian", "gradient_matching")
    smooth = grads.mean(1)                             # SmoothGrad on these perturbations
    # loss(w) = loss(SmoothGrad) + ||w - SmoothGrad||^2 on the same samples
    for w in (vg, smooth + 0.3, torch.zeros_like(vg)):
        torch.testing.assert_close(lfa_loss(z, grads, w, loss="gradient_matching"),
                                   lfa_loss(z, grads, smooth, loss="gradient_matching")
                                   + (w - smooth).pow(2).sum(1), rtol=1e-10, atol=1e-12)
    # no free lunch: each is the better explanation in its own neighbourhood
    wide = {name: loss_of(model, x0, target, w, "gaussian", "gradient_matching", sigma=1.0, seed=7).mean()
            for name, w in (("vg", vg), ("sg", smooth))}
    narrow = {name: loss_of(model, x0, target, w, "gaussian", "gradient_matching", sigma=0.01, seed=7).mean()
              for name, w in (("vg", vg), ("sg", smooth))}
    assert wide["sg"] < 0.8 * wide["vg"] and narrow["vg"] < 0.2 * narrow["sg"]


def test_metric_defaults_streaming_and_resume():
    f, a = linear_model()
    model = mlp()
    x0 = torch.randn(10, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    target = torch.arange(10) % 3
    z, x = perturb(x0, generator=torch.Generator().manual_seed(9))    # gaussian, 1000, sigma 0.1
    assert z.shape == (10, 1000, 5) and z.std().item() == pytest.approx(0.1, rel=0.02)
    zb, _ = perturb(x0, "binary", generator=torch.Generator().manual_seed(9))
    assert zb.mean().item() == pytest.approx(0.5, abs=0.01)
    zu, _ = perturb(x0, "uniform", generator=torch.Generator().manual_seed(9))
    assert zu.min().item() < 0.01 and zu.max().item() > 0.99         # low = 0
    r = responses(model, x0, x, target)                               # squared by default
    w = a[target]
    expected = lfa_loss(z, r, w).mean().item()
    metric = sdk.create("metric", "local_function_approximation")
    metric.update(z[:4], r[:4], w[:4])
    resumed = sdk.create("metric", "local_function_approximation")
    resumed.load_state_dict(metric.state_dict())
    for m in (metric, resumed):
        m.update(z[4:], r[4:], w[4:])
        assert m.compute() == pytest.approx(expected, rel=1e-12)
    given = sdk.create("metric", "local_function_approximation")
    fx0 = model(x0).gather(1, target[:, None])[:, 0].detach()        # g(z) = f(x0) + w^T z
    given.update(z, r, w, bias=fx0)
    resid = r - (z * w[:, None]).sum(2) - fx0[:, None]
    assert given.compute() == pytest.approx(0.5 * resid.pow(2).mean().item(), rel=1e-12)
    assert given.compute() > expected                                 # the best intercept is best
    gm = sdk.create("metric", "local_function_approximation", loss="gradient_matching")
    gm.update(z, responses(f, x0, x, target, loss="gradient_matching"), w)
    assert gm.compute() == 0.0
    z[0, 0, 0] = math.nan                                             # not measured as a number
    gm.update(z, responses(f, x0, x, target, loss="gradient_matching"), w)
    assert math.isnan(gm.compute())
    assert math.isnan(sdk.create("metric", "local_function_approximation").compute())


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "local_function_approximation")
    z, r, w = torch.zeros(3, 4, 2), torch.zeros(3, 4), torch.zeros(3, 2)
    with pytest.raises(sdk.errors.ShapeError, match=r"local_function_approximation: response must be floating \[3, 4\]"):
        metric.update(z, torch.zeros(3, 4, 2), w)
    with pytest.raises(sdk.errors.ShapeError, match=r"local_function_approximation: attributions must be floating \[3, 2\]"):
        metric.update(z, r, torch.zeros(3, 5))
    with pytest.raises(sdk.errors.ShapeError, match="local_function_approximation: z must be"):
        metric.update(z[0], r, w)
    with pytest.raises(sdk.errors.ShapeError, match="local_function_approximation: bias must be"):
        metric.update(z, r, w, bias=torch.zeros(2))
    with pytest.raises(sdk.errors.ConfigError, match="loss"):
        sdk.create("metric", "local_function_approximation", loss="l1")
    with pytest.raises(sdk.errors.ConfigError, match="sigma"):
        perturb(torch.zeros(2, 2), sigma=0.0)
    with pytest.raises(sdk.errors.ConfigError, match="neighbourhood"):
        perturb(torch.zeros(2, 2), "laplace")
    with pytest.raises(sdk.errors.ConfigError, match="low"):
        perturb(torch.zeros(2, 2), "uniform", low=1.0)
    with pytest.raises(sdk.errors.ConfigError, match="n_samples"):
        perturb(torch.zeros(2, 2), n_samples=0)
    with pytest.raises(sdk.errors.ConfigError, match="loss"):
        responses(mlp(d=2), torch.zeros(2, 2), torch.zeros(2, 3, 2), torch.zeros(2, dtype=torch.long), loss="l1")
    with pytest.raises(sdk.errors.ShapeError, match=r"local_function_approximation: x must be perturbed inputs"):
        responses(mlp(d=2), torch.zeros(2, 2), torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match="local_function_approximation: target"):
        responses(mlp(d=2), torch.zeros(2, 2), torch.zeros(2, 3, 2), torch.zeros(3, dtype=torch.long))
