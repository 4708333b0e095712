"""pulaski_set_distance: the debiased Sinkhorn divergence against a plain fixed-eps log-domain
Sinkhorn run to convergence, the energy distance against a double loop, S(mu, mu) = 0, and
set-matching samples that keep the raters' variability where a mean fit collapses it."""

import math

import pytest
import torch

import sdk
from plugins.classification.pulaski_set_distance import energy_distance, sinkhorn_divergence


def slow_ot(x, y, eps, iters=600):
    """OT_eps between uniform measures on the rows of x [N, P] and y [M, P]: plain alternating
    log-domain Sinkhorn at fixed eps (no annealing), cost |x - y|^2 / 2, <a, f> + <b, g>."""
    n, m = len(x), len(y)
    c = torch.stack([torch.stack([((x[i] - y[j]) ** 2).sum() / 2 for j in range(m)]) for i in range(n)])
    f, g = torch.zeros(n, dtype=x.dtype), torch.zeros(m, dtype=x.dtype)
    for _ in range(iters):
        f = -eps * torch.logsumexp((g[None, :] - c) / eps - math.log(m), 1)
        g = -eps * torch.logsumexp((f[:, None] - c) / eps - math.log(n), 0)
    return f.mean() + g.mean()


def slow_sinkhorn(x, y, eps):
    return slow_ot(x, y, eps) - slow_ot(x, x, eps) / 2 - slow_ot(y, y, eps) / 2


def slow_energy(x, y):
    def mean_dist(a, b):  # a point's distance to itself is 0 (and has no gradient)
        return sum(torch.sqrt(((a[i] - b[j]) ** 2).sum()) for i in range(len(a)) for j in range(len(b))
                   if not (a is b and i == j)) / (len(a) * len(b))
    return mean_dist(x, y) - mean_dist(x, x) / 2 - mean_dist(y, y) / 2


def loss_of(samples, masks, **kw):
    obj = sdk.create("objective", "pulaski_set_distance", beta=0.0, **kw)
    return obj(sdk.Views(embeddings=tuple(samples.unbind(1))), sdk.Batch(targets=masks))


def test_sinkhorn_matches_converged_fixed_eps_solver():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(2, 3, 3, generator=g, dtype=torch.float64) > 0.5).double()
    blur = 0.3  # a temperature at which the plain solver converges in a few thousand steps
    want = torch.stack([slow_sinkhorn(x[b], y[b], blur ** 2) for b in range(2)])
    # GeomLoss's annealed approximation (no iterations at the final temperature) is close ...
    assert torch.allclose(sinkhorn_divergence(x, y, blur=blur, scaling=0.7), want, rtol=1e-2)
    # ... and further iterations at eps = blur^2 converge to the fixed point
    got = sinkhorn_divergence(x, y, blur=blur, scaling=0.7, iters=500)
    assert torch.allclose(got, want, rtol=1e-6)
    # the envelope gradient of the last extrapolation is the converged divergence's gradient
    xa = x[0].clone().requires_grad_()
    got_g = torch.autograd.grad(sinkhorn_divergence(xa[None], y[:1], blur=blur, scaling=0.7, iters=500).sum(), xa)[0]
    xb = x[0].clone().requires_grad_()
    want_g = torch.autograd.grad(slow_sinkhorn(xb, y[0], blur ** 2), xb)[0]
    assert torch.allclose(got_g, want_g, rtol=1e-4, atol=1e-8)


def test_default_blur_divergence_is_zero_on_equal_sets_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 5, 16, generator=g, dtype=torch.float64)
    assert loss_of(x, x, distance="sinkhorn").per_sample.abs().max().item() < 1e-12
    assert loss_of(x, x).per_sample.abs().max().item() < 1e-12
    y = torch.rand(3, 4, 16, generator=g, dtype=torch.float64)
    assert (loss_of(x, y, distance="sinkhorn").per_sample > 0).all()
    assert (loss_of(x, y).per_sample > 0).all()
    # permuting a set changes nothing: the loss sees sets, not ordered pairs
    perm = loss_of(x[:, [4, 2, 0, 1, 3]], y, distance="sinkhorn").per_sample
    assert torch.allclose(perm, loss_of(x, y, distance="sinkhorn").per_sample, rtol=1e-10)


def test_energy_distance_matches_double_loop_value_and_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(3, 5, generator=g, dtype=torch.float64) > 0.5).double()
    got = energy_distance(x[None], y[None])[0]
    want = slow_energy(x, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-7)  # |x|^2 + |y|^2 - 2xy cancels
    got_g, = torch.autograd.grad(got, x)
    want_g, = torch.autograd.grad(slow_energy(x, y), x)
    assert torch.allclose(got_g, want_g, rtol=1e-6)


def test_kl_term_weighted_by_beta():
    g = torch.Generator().manual_seed(3)
    s = tuple(torch.rand(2, 4, generator=g) for _ in range(3))
    masks = (torch.rand(2, 2, 4, generator=g) > 0.5).float()
    kl = torch.tensor([0.5, 2.0])
    base = sdk.create("objective", "pulaski_set_distance", beta=0.0)(sdk.Views(embeddings=s), sdk.Batch(targets=masks))
    with_kl = sdk.create("objective", "pulaski_set_distance", beta=0.25)(
        sdk.Views(embeddings=s, extras={"kl": kl}), sdk.Batch(targets=masks))
    assert torch.allclose(with_kl.per_sample, base.per_sample + 0.25 * kl)


@pytest.mark.parametrize("distance", ["sinkhorn", "hausdorff"])
def test_samples_fitted_by_the_set_distance_keep_the_raters_variability(distance):
    # three raters disagree on a 1-D "vessel" (thresholds differ); samples are free parameters
    pixels = torch.linspace(0, 1, 12)
    masks = torch.stack([(pixels < t).float() for t in (0.3, 0.5, 0.7)])[None]  # [1, 3, 12]
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 12, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    obj = sdk.create("objective", "pulaski_set_distance", beta=0.0, distance=distance)
    for _ in range(50):
        loss = obj(sdk.Views(embeddings=tuple(torch.sigmoid(logits).unbind(1))), sdk.Batch(targets=masks)).value
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = torch.sigmoid(logits).detach()
    rater_var = masks.var(1, unbiased=False)
    sample_var = samples.var(1, unbiased=False)
    # per-pixel cross-entropy against every rater pulls each sample to the raters' mean: variance 0
    assert (sample_var - rater_var).abs().mean() < 0.25 * rater_var.mean()


def test_errors():
    s = (torch.rand(2, 4),)
    obj = sdk.create("objective", "pulaski_set_distance")
    with pytest.raises(sdk.ShapeError, match=r"Batch.targets must be the raters' masks \[B=2, R, P=4\]"):
        obj(sdk.Views(embeddings=s), sdk.Batch(targets=torch.rand(2, 4)))
    with pytest.raises(sdk.RequirementError, match=r"needs the model's KL"):
        obj(sdk.Views(embeddings=s), sdk.Batch(targets=torch.rand(2, 3, 4)))
    with pytest.raises(sdk.ShapeError, match=r"Views.extras\['kl'\] must be \[2\]"):
        obj(sdk.Views(embeddings=s, extras={"kl": torch.zeros(3)}), sdk.Batch(targets=torch.rand(2, 3, 4)))
    with pytest.raises(sdk.ConfigError, match="distance"):
        sdk.create("objective", "pulaski_set_distance", distance="fid")
