"""genview_quality_weight: the weights equal a slow loop over the authors' steps (projection,
min-max maps, pooled foreground / background, cosine difference, B softmax(gamma q)), average to
exactly 1, are detached, are invariant to a patch permutation shared by both views and to a positive
rescaling of the tokens, a flipped direction negates q (foreground and background swap), the
principal direction is the reference tokens' top component, and on digits with a shared background
texture the pairs whose second view shows a different digit get lower weights."""

import math

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.training.genview_quality_weight import pair_quality, principal_direction, quality_weights
from sdk import keys
from sdk.types import Batch, Loss

NAME = "genview_quality_weight"


def dot(a, c):
    return sum(x * y for x, y in zip(a, c))


def cosine(a, c):
    return dot(a, c) / math.sqrt(dot(a, a) * dot(c, c))


def slow_weights(t1, t2, u, gamma=1.0, eps=1e-7, distance="cosine"):
    b, p, d = t1.shape
    qs = []
    for i in range(b):
        pooled = []
        for t in (t1[i], t2[i]):
            m = [sum(float(t[k, j]) * float(u[j]) for j in range(d)) for k in range(p)]
            lo, hi = min(m), max(m)
            fg = [(v - lo) / (hi - lo + eps) for v in m]
            bg = [1 - v for v in fg]
            sf, sb = sum(fg) + eps, sum(bg) + eps
            f = [sum(fg[k] / sf * float(t[k, j]) for k in range(p)) for j in range(d)]
            g = [sum(bg[k] / sb * float(t[k, j]) for k in range(p)) for j in range(d)]
            pooled.append((f, g))
        cos = cosine if distance == "cosine" else dot
        qs.append(cos(pooled[0][0], pooled[1][0]) - cos(pooled[0][1], pooled[1][1]))
    e = [math.exp(gamma * q) for q in qs]
    return [b * x / sum(e) for x in e], qs


def tokens(b=6, p=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, d, generator=g), torch.randn(b, p, d, generator=g)


@pytest.mark.parametrize("gamma,distance", [(1.0, "cosine"), (3.0, "cosine"), (2.0, "dot")])
def test_weights_equal_a_slow_loop_and_average_to_one(gamma, distance):
    t1, t2 = tokens()
    u = torch.nn.functional.normalize(torch.randn(5, generator=torch.Generator().manual_seed(9)), dim=0)
    want, _ = slow_weights(t1, t2, u, gamma, distance=distance)
    w = quality_weights(t1, t2, u, gamma=gamma, distance=distance)
    assert torch.allclose(w, torch.tensor(want), rtol=1e-5)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    rw = sdk.create("reweighter", NAME, gamma=gamma, direction=u, distance=distance)
    default = sdk.create("reweighter", NAME)
    assert (default.gamma, default.distance) == (1.0, "cosine")  # the paper's defaults
    per = (torch.rand(6, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
    reduced = rw.reduce(Loss(value=per.mean(), per_sample=per), Batch(extras={keys.VIEW_TOKENS: (t1, t2)}))
    assert reduced.value.item() == pytest.approx(sum(x * l for x, l in zip(want, per.tolist())) / 6, rel=1e-5)
    grad = torch.autograd.grad(reduced.value, per)[0]  # detached weights: the gradient is w / B
    assert torch.allclose(grad, torch.tensor(want) / 6, rtol=1e-5)


def test_invariances_and_the_flipped_direction():
    t1, t2 = tokens(seed=2)
    u = torch.randn(5, generator=torch.Generator().manual_seed(3))
    q = pair_quality(t1, t2, u)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(pair_quality(t1[:, perm], t2[:, perm], u), q, atol=1e-6)
    assert torch.allclose(pair_quality(3.0 * t1, 0.5 * t2, u), q, atol=1e-5)
    assert torch.allclose(pair_quality(t1, t2, -u), -q, atol=1e-5)
    dot = pair_quality(t1, t2, u, distance="dot")
    assert not torch.allclose(dot, q)


def test_principal_direction_is_the_top_component_with_a_small_foreground():
    g = torch.Generator().manual_seed(5)
    axis = torch.tensor([0.0, 0.6, 0.8, 0.0])
    # each image: 2 of 10 tokens far along +axis (foreground), the rest near 0
    t = 0.05 * torch.randn(40, 10, 4, generator=g)
    t[:, :2] += 3 * axis
    u = principal_direction(t)
    assert torch.allclose(u, axis, atol=0.02)
    assert torch.allclose(principal_direction(t - 5 * axis), axis, atol=0.02)  # a shift is no matter
    flipped = -t  # now the 2 far tokens sit along -axis: the direction follows them
    assert torch.allclose(principal_direction(flipped), -axis, atol=0.02)


def digit_tokens(img):
    """A frozen 'encoder' on 8x8 digits: 2x2-pixel patches as tokens, their pixels and their
    position one-hot scaled by the patch's mean intensity."""
    b = img.shape[0]
    patches = img.view(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
    return torch.cat([patches, patches.mean(-1, keepdim=True) * torch.eye(16)], -1)


def view(digit, texture, g):
    return (torch.maximum(digit, texture) + 0.05 * torch.randn(digit.shape, generator=g)).clamp(0, 1)


def test_on_digits_pairs_with_a_different_foreground_weigh_less():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    rw = sdk.create("reweighter", NAME).fit(digit_tokens(x[:500]))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[:256]
        texture = 0.3 * torch.rand(256, 64, generator=g)  # one background per pair, in both views
        other = torch.randint(len(x), (256,), generator=g)
        bad = (torch.rand(256, generator=g) < 0.2) & (y[other] != y[idx])
        v1 = view(x[idx], texture, g)
        v2 = view(torch.where(bad[:, None], x[other], x[idx]), texture, g)
        w = rw.weights(torch.ones(256), Batch(extras={keys.VIEW_TOKENS: (digit_tokens(v1), digit_tokens(v2))}))
        w = 256 * w
        auroc = (w[~bad][:, None] > w[bad][None]).float().mean().item()
        # measured: bad pairs 0.991-0.994 vs good 1.001-1.002, AUROC 0.74-0.80
        assert w[bad].mean() < w[~bad].mean() and auroc > 0.7, (seed, auroc)


def test_bad_input():
    with pytest.raises(sdk.ConfigError, match="gamma must be > 0"):
        sdk.create("reweighter", NAME, gamma=0.0)
    with pytest.raises(sdk.ConfigError, match="distance must be one of"):
        sdk.create("reweighter", NAME, distance="l2")
    with pytest.raises(sdk.ShapeError, match=f"{NAME}.*direction must be a floating vector"):
        sdk.create("reweighter", NAME, direction=torch.ones(2, 2))
    t1, t2 = tokens()
    per = torch.ones(6)
    with pytest.raises(sdk.NotFittedError, match=f"{NAME}.*no direction"):
        sdk.create("reweighter", NAME).weights(per, Batch(extras={keys.VIEW_TOKENS: (t1, t2)}))
    rw = sdk.create("reweighter", NAME, direction=torch.ones(5))
    with pytest.raises(sdk.RequirementError, match=f"{NAME}.*view_tokens"):
        rw.weights(per, Batch())
    with pytest.raises(sdk.ShapeError, match="must be a pair"):
        rw.weights(per, Batch(extras={keys.VIEW_TOKENS: (t1,)}))
    with pytest.raises(sdk.ShapeError, match=r"\[1\] must be floating tokens \[6, P, 5\]"):
        rw.weights(per, Batch(extras={keys.VIEW_TOKENS: (t1, t2[:, :, :4])}))
    with pytest.raises(sdk.ShapeError, match=r"\[0\] must be floating tokens \[6, P, 5\]"):
        rw.weights(per, Batch(extras={keys.VIEW_TOKENS: (t1[:5], t2)}))
    with pytest.raises(sdk.ShapeError, match="reference tokens must be floating"):
        rw.fit(torch.ones(4, dtype=torch.long))
