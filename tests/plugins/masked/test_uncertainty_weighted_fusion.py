"""uncertainty_weighted_fusion (ProDepth): the static weight, the cost-volume fusion and the
reweighted loss against per-pixel loops of the authors' formulas (value and gradient), the
fusion's limits, and the loss's effect: a free multi-frame disparity optimised on a misleading
reprojection error on moving pixels follows the single-frame depth there, while the plain
reprojection loss follows the mismatch."""

import math

import pytest
import torch

import sdk
from plugins.masked.uncertainty_weighted_fusion import (
    MATCHING_DISPARITY,
    MONO_DISPARITY,
    REPROJECTION_ERROR,
    disp_to_depth,
    fuse_distributions,
    static_weight,
)

NAME = "uncertainty_weighted_fusion"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _scaled(disp, lo=0.1, hi=100.0):
    s = 1 / hi + (1 / lo - 1 / hi) * disp
    return s, 1 / s


def test_defaults_and_the_disparity_mapping():
    obj = sdk.create("objective", NAME)
    assert (obj.min_depth, obj.max_depth, obj.scale, obj.threshold, obj.consistency_weight) == (
        0.1, 100.0, 2 / 3, 0.4, 0.1)
    s, d = disp_to_depth(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(d, torch.tensor([100.0, 0.1]))
    torch.testing.assert_close(s, torch.tensor([0.01, 10.0]))


def test_static_weight_is_the_product_of_depth_and_disparity_agreement():
    mono = torch.rand(3, 7, generator=_g(), dtype=torch.float64)
    matching = torch.rand(3, 7, generator=_g(1), dtype=torch.float64)
    matching[0] = mono[0] + 1e-4  # nearly agreeing: static
    w, static = static_weight(mono, matching)
    for i in range(3):
        for p in range(7):
            s_m, d_m = _scaled(float(mono[i, p]))
            s_c, d_c = _scaled(float(matching[i, p]))
            expect = math.exp(-2 / 3 * abs(d_c - d_m)) * math.exp(-2 / 3 * abs(s_c - s_m))
            assert abs(float(w[i, p]) - expect) < 1e-12
            assert float(static[i, p]) == float(expect > 0.4)
    assert static[0].all() and not static.all()


def test_fusion_equals_a_per_pixel_loop_of_pcvm():
    b, k, h, wd = 2, 6, 2, 3
    cost = torch.rand(b, k, h, wd, generator=_g(2), dtype=torch.float64)
    bins = torch.linspace(1.0, 20.0, k, dtype=torch.float64)
    mono_depth = 1 + 19 * torch.rand(b, 1, h, wd, generator=_g(3), dtype=torch.float64)
    sigma = 1 + 5 * torch.rand(b, 1, h, wd, generator=_g(4), dtype=torch.float64)
    w = torch.rand(b, 1, h, wd, generator=_g(5), dtype=torch.float64)
    static = (w > 0.4).double()
    refined, fused = fuse_distributions(cost, bins, mono_depth, sigma, w, static)
    eps = 1e-7

    def mm(v):
        return [(x - min(v)) / (max(v) - min(v) + eps) for x in v]

    for i in range(b):
        for y in range(h):
            for x in range(wd):
                c = [float(cost[i, j, y, x]) for j in range(k)]
                cn = mm(c)
                z = sum(math.exp(-v) for v in cn)
                p_cv = mm([math.exp(-v) / z for v in cn])
                m, sd = float(mono_depth[i, 0, y, x]), float(sigma[i, 0, y, x])
                p_mono = mm([math.exp(-(float(d) - m) ** 2 / (2 * sd ** 2)) / (sd * math.sqrt(2 * math.pi))
                             for d in bins])
                wp = float(w[i, 0, y, x])
                f = p_cv if wp > 0.4 else [a ** wp * g ** (1 - wp) for a, g in zip(p_cv, p_mono)]
                r = [(max(f) - v) / (max(f) - min(f) + eps) * (max(c) - min(c)) + min(c) for v in f]
                torch.testing.assert_close(fused[i, :, y, x], torch.tensor(f, dtype=torch.float64))
                torch.testing.assert_close(refined[i, :, y, x], torch.tensor(r, dtype=torch.float64))


def test_moving_pixels_follow_the_single_frame_depth_and_static_ones_the_cost_volume():
    """The cost volume's best match is bin 1 everywhere (cost rising linearly away from it); the
    single-frame depth sits on bin 5."""
    k = 8
    bins = torch.linspace(2.0, 16.0, k)
    cost = ((torch.arange(k) - 1).abs() / 7.0).view(1, k, 1, 1).expand(1, k, 1, 3)
    obj = sdk.create("objective", NAME)
    mono_depth = torch.full((1, 1, 1, 3), float(bins[5]))
    mono_disp = (1 / mono_depth - 0.01) / (10 - 0.01)  # the sigmoid output of that depth
    # pixel 0 agrees (static), pixel 1 disagrees (moving), pixel 2 disagrees mildly
    matching_depth = torch.tensor([float(bins[5]), float(bins[1]), float(bins[5]) - 1.5]).view(1, 1, 1, 3)
    matching_disp = (1 / matching_depth - 0.01) / (10 - 0.01)
    w, static = obj.weight(mono_disp, matching_disp)
    assert static.flatten().tolist() == [1.0, 0.0, 0.0] and 0 < float(w[0, 0, 0, 2]) <= 0.4
    refined, fused = obj.modulate(cost, bins, mono_disp, torch.full_like(mono_disp, 2.0), matching_disp)
    assert fused.argmax(1).flatten().tolist() == [1, 5, 5]
    assert refined.argmin(1).flatten().tolist() == [1, 5, 5]  # low refined cost = chosen depth
    assert float(fused[0, 1, 0, 2]) > float(fused[0, 1, 0, 1])  # more static, more of the cost volume


def test_loss_equals_a_per_pixel_loop_value_and_gradient():
    obj = sdk.create("objective", NAME, consistency_weight=0.3).double()
    views, batch = obj.example_inputs(4, _g(6))
    views = sdk.Views(embeddings=(views.embeddings[0].double().detach().requires_grad_(),),
                      extras={k: v.double().detach().requires_grad_() for k, v in views.extras.items()})
    loss = obj(views, batch)
    disp, rep = views.embeddings[0], views.extras[REPROJECTION_ERROR]
    mono, matching = views.extras[MONO_DISPARITY], views.extras[MATCHING_DISPARITY]
    rows = []
    for i in range(4):
        num = den = cons = 0.0
        for p in range(disp.shape[1]):
            s_m, d_m = _scaled(mono[i, p].detach())
            s_c, d_c = _scaled(matching[i, p].detach())
            w = torch.exp(-2 / 3 * (d_c - d_m).abs()) * torch.exp(-2 / 3 * (s_c - s_m).abs())
            m = w * (w > 0.4)
            num, den = num + m * rep[i, p], den + m
            cons = cons + (1 - m) * (_scaled(disp[i, p])[0] - s_m).abs()
        rows.append(num / (den + 1e-7) + 0.3 * cons / disp.shape[1])
    slow = torch.stack(rows)
    torch.testing.assert_close(loss.per_sample, slow)
    grads = torch.autograd.grad(loss.value, [disp, rep, mono, matching], allow_unused=True)
    slow_grads = torch.autograd.grad(slow.mean(), [disp, rep])
    torch.testing.assert_close(grads[0], slow_grads[0])
    torch.testing.assert_close(grads[1], slow_grads[1])
    assert grads[2] is None and grads[3] is None  # the single-frame and cost-volume outputs are targets
    assert 0 < float(loss.logs["static_fraction"]) < 1


def test_reweighting_keeps_moving_pixels_on_the_single_frame_depth():
    """Moving pixels: the reprojection error is lowest at a wrong disparity (the static-scene
    assumption fails) and the cost-volume decoder reports it; the single-frame disparity is right.
    Minimising ProDepth's loss puts them near the single-frame disparity; the plain mean
    reprojection error puts them on the wrong one. Static pixels are fit in both."""
    n, moving = 40, torch.arange(40) % 4 == 0
    true = 0.2 + 0.6 * torch.rand(1, n, generator=_g(7))
    wrong = torch.where(moving, true + 0.3, true)
    mono = true + 0.01 * torch.randn(1, n, generator=_g(8))
    obj = sdk.create("objective", NAME)

    def fit(weighted):
        disp = torch.full((1, n), 0.5, requires_grad=True)
        opt = torch.optim.Adam([disp], lr=0.03)
        for _ in range(100):
            rep = (disp - wrong).abs()
            if weighted:
                views = sdk.Views(embeddings=(disp,), extras={REPROJECTION_ERROR: rep,
                                                              MONO_DISPARITY: mono,
                                                              MATCHING_DISPARITY: wrong})
                loss = obj(views, sdk.Batch()).value
            else:
                loss = rep.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return disp.detach()

    plain, prodepth = fit(False), fit(True)
    assert (plain - wrong)[0, moving].abs().max() < 0.03
    assert (prodepth - true)[0, moving].abs().max() < 0.05
    assert (prodepth - true)[0, ~moving].abs().max() < 0.03


def test_errors_name_the_plugin_and_the_field():
    obj = sdk.create("objective", NAME)
    views, batch = obj.example_inputs(3, _g())
    with pytest.raises(sdk.RequirementError, match=f"'{NAME}' needs extras\\['reprojection_error'\\]"):
        obj(sdk.Views(embeddings=views.embeddings), batch)
    bad = dict(views.extras, mono_disparity=torch.rand(3, 5))
    with pytest.raises(sdk.ShapeError, match=f"'{NAME}'.*mono_disparity.*\\[3, 12\\]"):
        obj(sdk.Views(embeddings=views.embeddings, extras=bad), batch)
    with pytest.raises(sdk.ConfigError, match=f"{NAME}: max_depth must exceed min_depth"):
        sdk.create("objective", NAME, min_depth=5.0, max_depth=1.0)
    with pytest.raises(sdk.ConfigError, match=f"{NAME}: threshold"):
        sdk.create("objective", NAME, threshold=1.0)
    with pytest.raises(sdk.ShapeError, match=f"{NAME}: modulate's sigma must be \\[1, 1, 2, 2\\]"):
        obj.modulate(torch.rand(1, 4, 2, 2), torch.arange(4.0), torch.rand(1, 1, 2, 2),
                     torch.rand(1, 2, 2), torch.rand(1, 1, 2, 2))
