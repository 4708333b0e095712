"""ensloss: its derivatives against a written-out generator (value and gradient), the
calibration conditions the paper requires (negative everywhere, non-decreasing in the margin,
a 1/s tail), a fresh loss per batch, and an exact resume of its generator."""

import math

import pytest
import torch

import sdk


def slow_derivatives(margins, draws, lam):
    slopes = sorted(max(-(math.exp(e) if lam == 0 else max(1 + lam * e, 0) ** (1 / lam)), -1.0)
                    for e in draws.tolist())
    order = sorted(range(len(margins)), key=lambda i: float(margins[i]))
    g = [0.0] * len(margins)
    for rank_, i in enumerate(order):
        g[i] = slopes[rank_]
        if float(margins[i]) > 1:
            g[i] /= float(margins[i])
        g[i] -= 1e-6
    return torch.tensor(g, dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_matches_the_generator_value_and_gradient(lam):
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(9, 1, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    obj = sdk.create("objective", "ensloss", lam=lam, seed=7)
    loss = obj(sdk.Views(logits=z), sdk.Batch(targets=y))
    draws = torch.randn(9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    s = z[:, 0] * (2 * y - 1)
    want = slow_derivatives(s.detach(), draws, lam)
    assert torch.allclose(loss.per_sample, want * s, rtol=1e-12)
    (grad,) = torch.autograd.grad(loss.value, z)
    assert torch.allclose(grad[:, 0], want * (2 * y - 1) / 9, rtol=1e-12)


def test_default_generator_is_the_exponential():
    # lam = 0 (the default): slopes -min(exp(e), 1); a default change moves them (lam = 0.1 by > 1e-3)
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(12, 1, generator=g, dtype=torch.float64), torch.arange(12) % 2
    got = sdk.create("objective", "ensloss", seed=5)(sdk.Views(logits=z), sdk.Batch(targets=y)).per_sample
    draws = torch.randn(12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = z[:, 0] * (2 * y - 1)
    assert torch.allclose(got, slow_derivatives(s, draws, 0.0) * s, rtol=1e-12)
    assert not torch.allclose(got, slow_derivatives(s, draws, 0.1) * s, rtol=1e-3)


def test_derivatives_are_calibrated_and_drawn_anew():
    from plugins.classification.ensloss import random_derivatives

    g = torch.Generator().manual_seed(1)
    margins = torch.linspace(-3, 4, 200, dtype=torch.float64)[torch.randperm(200, generator=g)]
    d = random_derivatives(margins, torch.randn(200, generator=g, dtype=torch.float64))
    order = margins.argsort()
    assert (d < 0).all() and (d >= -1 - 1e-6).all()  # phi' < 0 everywhere, capped
    assert (d[order].diff() >= 0).all()  # non-decreasing in the margin: a convex loss
    above = margins > 1
    assert ((d[above] + 1e-6) * margins[above] >= -1).all()  # a slope over s above 1: a decaying tail
    obj = sdk.create("objective", "ensloss")
    z, y = torch.randn(16, 1, dtype=torch.float64), torch.arange(16) % 2
    first, second = (obj(sdk.Views(logits=z), sdk.Batch(targets=y)).per_sample for _ in range(2))
    assert not torch.allclose(first, second)  # a new loss for every batch


def test_generator_state_resumes():
    obj = sdk.create("objective", "ensloss", seed=3)
    z, y = torch.randn(8, 1, dtype=torch.float64), torch.arange(8) % 2
    obj(sdk.Views(logits=z), sdk.Batch(targets=y))
    state = obj.state_dict()
    after = obj(sdk.Views(logits=z), sdk.Batch(targets=y)).per_sample
    fresh = sdk.create("objective", "ensloss", seed=3)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(sdk.Views(logits=z), sdk.Batch(targets=y)).per_sample, after)


def test_errors():
    obj = sdk.create("objective", "ensloss")
    with pytest.raises(sdk.ShapeError, match=r"ensloss: Views.logits must be one binary score"):
        obj(sdk.Views(logits=torch.zeros(3, 2)), sdk.Batch(targets=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match=r"ensloss: Batch.targets must lie in \[0, 2\)"):
        obj(sdk.Views(logits=torch.zeros(3, 1)), sdk.Batch(targets=torch.tensor([0, 1, 2])))
