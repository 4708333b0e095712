"""Global and local contrastive losses against float64 loops over the pairs (value and
gradient, every strategy), their positive sets and the region grid."""

import math

import pytest
import torch

import sdk
from plugins.ssl.global_local_contrastive import (
    FEATURE_MAPS,
    PARTITION,
    global_contrastive_loss,
    local_contrastive_loss,
    local_regions,
)


def cos(a, b):
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def pair_loss(anchor, positive, negatives, tau):
    """-log e^{s_ap/tau} / (e^{s_ap/tau} + sum_n e^{s_an/tau}), as a plain sum."""
    num = torch.exp(cos(anchor, positive) / tau)
    den = num + sum((torch.exp(cos(anchor, n) / tau) for n in negatives), torch.zeros((), dtype=num.dtype))
    return -torch.log(num / den)


def slow_global(zs, part, strategy, tau):
    items = [(v, i) for v in range(len(zs)) for i in range(zs[0].shape[0])]
    total, pairs = 0.0, 0
    for a in items:
        for p in items:
            if p == a:
                continue
            same_image, same_part = a[1] == p[1], int(part[a[1]]) == int(part[p[1]])
            if not (same_part if strategy == "partition" else same_image):
                continue
            negs = [zs[n[0]][n[1]] for n in items
                    if (n[1] != a[1] if strategy == "random" else int(part[n[1]]) != int(part[a[1]]))]
            total = total + pair_loss(zs[a[0]][a[1]], zs[p[0]][p[1]], negs, tau)
            pairs += 1
    return total / pairs


def slow_local(fs, part, strategy, size, tau):
    v, b, _, h, w = len(fs), fs[0].shape[0], *fs[0].shape[1:]
    grid = [(r, c) for r in range(h // size) for c in range(w // size)]

    def region(view, i, u):
        r, c = grid[u]
        return fs[view][i, :, r * size:(r + 1) * size, c * size:(c + 1) * size].reshape(-1)

    items = [(view, i, u) for view in range(v) for i in range(b) for u in range(len(grid))]
    total, pairs = 0.0, 0
    for a in items:
        for p in items:
            if p == a or p[2] != a[2]:
                continue
            linked = a[1] == p[1] if strategy == "random" else int(part[a[1]]) == int(part[p[1]])
            if not linked:
                continue
            negs = [region(*n) for n in items if n[1] in (a[1], p[1]) and n[2] != a[2]]
            total = total + pair_loss(region(*a), region(*p), negs, tau)
            pairs += 1
    return total / pairs


def _views(b=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))


def _maps(b=3, c=2, h=5, w=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, c, h, w, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))


@pytest.mark.parametrize("strategy", ["random", "partition_negatives", "partition"])
def test_global_loss_matches_the_pair_loop(strategy):
    zs, part = _views(), torch.tensor([0, 1, 0, 2, 1])
    got = global_contrastive_loss(zs, part, strategy, 0.1)
    want = slow_global(zs, part, strategy, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, zs), torch.autograd.grad(want, zs)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_random_strategy_is_simclr():
    zs = _views(seed=3)
    got = global_contrastive_loss(zs, None, "random", 0.5)
    nt = sdk.create("objective", "nt_xent", temperature=0.5)(sdk.Views(embeddings=zs)).value
    assert got.item() == pytest.approx(nt.item(), rel=1e-6)  # nt_xent computes in float32


@pytest.mark.parametrize("strategy", ["random", "partition"])
def test_local_loss_matches_the_pair_loop(strategy):
    fs, part = _maps(), torch.tensor([0, 1, 0])
    got = local_contrastive_loss(fs, part, strategy, 2, 0.1)
    want = slow_local(fs, part, strategy, 2, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, fs), torch.autograd.grad(want, fs)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_region_grid_is_row_major_and_drops_the_remainder():
    f = torch.arange(2 * 5 * 4, dtype=torch.float64).reshape(1, 2, 5, 4)
    r = local_regions(f, 2)
    assert r.shape == (1, 4, 8)  # rows 0-3 in two bands, columns 0-3: row 4 dropped
    torch.testing.assert_close(r[0, 1], f[0, :, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(r[0, 2], f[0, :, 2:4, 0:2].reshape(-1))


def test_partition_positives_are_pulled_together():
    """G^D makes two images of one partition positives: moving them together lowers the loss,
    while G^{D-} (only negatives pruned) does not see the move at all."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 6, generator=g, dtype=torch.float64)
    part = torch.tensor([0, 0, 1, 1])
    close = z.clone()
    close[1] = z[0] + 0.05 * z[1]
    views = lambda x: (x, x + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64))  # noqa: E731
    far_v, close_v = views(z), views(close)
    assert (global_contrastive_loss(close_v, part, "partition")
            < global_contrastive_loss(far_v, part, "partition") - 0.5)
    # G^{D-}: images 0 and 1 are neither positives nor negatives of each other
    d_minus = [global_contrastive_loss(v, part, "partition_negatives").item() for v in (far_v, close_v)]
    assert abs(d_minus[0] - d_minus[1]) < 0.2 * abs(
        global_contrastive_loss(close_v, part, "partition").item()
        - global_contrastive_loss(far_v, part, "partition").item())


def test_objective_weights_terms_and_reads_extras():
    zs, fs = _views(b=3), _maps(b=3, h=6, w=6)
    part = torch.tensor([0, 1, 0])
    obj = sdk.create("objective", "global_local_contrastive", global_weight=0.5, local_weight=2.0)
    loss = obj(sdk.Views(embeddings=zs, extras={FEATURE_MAPS: fs}), sdk.Batch(extras={PARTITION: part}))
    want = 0.5 * global_contrastive_loss(zs, part, "partition", 0.1) + 2.0 * local_contrastive_loss(
        fs, part, "random", 3, 0.1)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-12)
    assert set(loss.logs) == {"global", "local"}
    assert math.isfinite(loss.logs["local"].item())
    alone = sdk.create("objective", "global_local_contrastive", global_strategy="random", local_weight=0)
    assert alone(sdk.Views(embeddings=zs)).value.item() == pytest.approx(
        global_contrastive_loss(zs, None, "random", 0.1).item(), rel=1e-12)


def test_bad_inputs_name_the_plugin_and_field():
    zs, fs = _views(b=3), _maps(b=3, h=6, w=6)
    obj = sdk.create("objective", "global_local_contrastive")
    part = sdk.Batch(extras={PARTITION: torch.tensor([0, 1, 0])})
    with pytest.raises(sdk.RequirementError, match="'global_local_contrastive'.*partition"):
        obj(sdk.Views(embeddings=zs, extras={FEATURE_MAPS: fs}))
    with pytest.raises(sdk.RequirementError, match="'global_local_contrastive'.*feature_maps"):
        obj(sdk.Views(embeddings=zs), part)
    with pytest.raises(sdk.ShapeError, match="'global_local_contrastive'.*partition.*2 rows"):
        obj(sdk.Views(embeddings=zs, extras={FEATURE_MAPS: fs}),
            sdk.Batch(extras={PARTITION: torch.tensor([0, 1])}))
    with pytest.raises(sdk.ShapeError, match="'global_local_contrastive'.*feature_maps.*\\[1\\].*region_size=3"):
        obj(sdk.Views(embeddings=zs, extras={FEATURE_MAPS: (fs[0], fs[1][:, :, :2, :2])}), part)
    with pytest.raises(sdk.ConfigError, match="global_local_contrastive.*both 0"):
        sdk.create("objective", "global_local_contrastive", global_weight=0, local_weight=0)
