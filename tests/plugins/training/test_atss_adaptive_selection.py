"""atss_adaptive_selection: on random ground-truth boxes over a three-level grid of jittered
anchors, the selection equals Algorithm 1 written as plain loops (k nearest centres per level,
IoU >= mean + unbiased std of the candidates, centre inside the box, the highest IoU wins); the
threshold has its analytic value and the selection is invariant to increasing affine maps of the
scores; the sampler applies the rule to cosine similarities with the views as levels, never
selects a row itself and trains nt_xent."""

import math
import statistics

import pytest
import torch

import sdk
from plugins.training.atss_adaptive_selection import atss_select

NAME = "atss_adaptive_selection"


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def scene(seed):
    """Anchors of side 4 * stride on grids of stride 4, 8, 16 over a 64 x 64 image (centres
    jittered so no two distances tie), and 6 random boxes."""
    g = torch.Generator().manual_seed(seed)
    anchors, sizes = [], []
    for stride in (4, 8, 16):
        n = 64 // stride
        level = []
        for i in range(n):
            for j in range(n):
                cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
                cx, cy = cx + 0.01 * float(torch.randn(1, generator=g)), cy + 0.01 * float(torch.randn(1, generator=g))
                half = 2 * stride
                level.append((cx - half, cy - half, cx + half, cy + half))
        anchors += level
        sizes.append(len(level))
    boxes = []
    for _ in range(6):
        x0, y0 = (torch.rand(2, generator=g) * 40).tolist()
        w, h = (torch.rand(2, generator=g) * 24 + 6).tolist()
        boxes.append((x0, y0, x0 + w, y0 + h))
    return anchors, sizes, boxes


def slow_atss(anchors, sizes, boxes, k=9):
    centre = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in anchors]
    pos = [[False] * len(anchors) for _ in boxes]
    for g, box in enumerate(boxes):
        gc = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        cands, start = [], 0
        for size in sizes:
            level = sorted(range(start, start + size), key=lambda a: math.dist(centre[a], gc))
            cands += level[:min(k, size)]
            start += size
        ious = [iou(anchors[a], box) for a in cands]
        t = statistics.mean(ious) + statistics.stdev(ious)
        for a, v in zip(cands, ious):
            cx, cy = centre[a]
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            pos[g][a] = v >= t and inside
    for a in range(len(anchors)):  # one box per anchor: the highest IoU
        owners = [g for g in range(len(boxes)) if pos[g][a]]
        if len(owners) > 1:
            best = max(owners, key=lambda g: (iou(anchors[a], boxes[g]), -g))
            for g in owners:
                pos[g][a] = g == best
    return torch.tensor(pos)


def tensors(anchors, sizes, boxes):
    a, b = torch.tensor(anchors, dtype=torch.float64), torch.tensor(boxes, dtype=torch.float64)
    ious = torch.tensor([[iou(x, y) for x in anchors] for y in boxes], dtype=torch.float64)
    ac = (a[:, :2] + a[:, 2:]) / 2
    bc = (b[:, :2] + b[:, 2:]) / 2
    dist = torch.cdist(bc, ac)
    ltrb = torch.stack([ac[None, :, 0] - b[:, None, 0], ac[None, :, 1] - b[:, None, 1],
                        b[:, None, 2] - ac[None, :, 0], b[:, None, 3] - ac[None, :, 1]], -1)
    return ious, dist, ltrb.amin(-1) > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_on_boxes_equals_algorithm_1_as_loops(seed):
    anchors, sizes, boxes = scene(seed)
    ious, dist, inside = tensors(anchors, sizes, boxes)
    got = atss_select(ious, dist, sizes, valid=inside)
    want = slow_atss(anchors, sizes, boxes)
    assert want.sum() > 6 and torch.equal(got, want)
    shared = atss_select(ious, dist, sizes, valid=inside, unique=False)
    assert torch.equal(got, shared & got) and (shared.sum(0) <= 1).all() == torch.equal(got, shared)


def test_threshold_is_mean_plus_unbiased_std_and_affine_invariant():
    s = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
    d = torch.tensor([[0.0, 1.0, 2.0, 9.0]])  # the 4th is not among the k = 3 nearest
    # mean 0.5, unbiased std 0.4: only 0.9 reaches 0.9
    assert atss_select(s, d, [4], 3).tolist() == [[False, False, True, False]]
    # levels matter: k = 2 of one level gives {0.1, 0.5} (t = 0.583, none); k = 2 of each of two
    # levels gives all four (t = 0.45 + 0.342)
    assert not atss_select(s, d, [4], 2).any()
    assert atss_select(s, d, [2, 2], 2).tolist() == [[False, False, True, False]]
    g = torch.Generator().manual_seed(4)
    s, d = torch.rand(5, 40, generator=g).double(), torch.rand(5, 40, generator=g).double()
    base = atss_select(s, d, [10, 20, 10])
    assert torch.equal(atss_select(3 * s - 2, d, [10, 20, 10]), base)
    assert torch.equal(atss_select(s, 5 * d + 1, [10, 20, 10]), base)
    assert not torch.equal(atss_select(s, d, [10, 20, 10], 4), base)  # k matters


def test_infinite_distance_is_no_candidate():
    s = torch.tensor([[1.0, 0.1, 0.5, 0.9]])
    d = torch.tensor([[float("inf"), 0.0, 1.0, 2.0]])
    assert atss_select(s, d, [4], 9).tolist() == [[False, False, False, True]]


def test_defaults():
    sampler = sdk.create("sampler", NAME)
    assert sampler.k == 9 and sampler.unique is False and sampler.with_views is True
    s = torch.tensor([[0.9, 0.8], [0.95, 0.1]])
    assert atss_select(s, -s, [2], 1).tolist() == [[False, False], [True, False]]  # unique=True


def views(seed, b=12, n_views=2, d=5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g)
    return sdk.Views(embeddings=[base + 0.3 * torch.randn(b, d, generator=g) for _ in range(n_views)])


def test_sampler_is_the_rule_on_cosine_similarity_with_views_as_levels():
    v = views(5, n_views=3)
    z = torch.nn.functional.normalize(torch.cat(v.embeddings), dim=1)
    sim = z @ z.T
    eye = torch.eye(36, dtype=torch.bool)
    want = atss_select(sim, (1 - sim).masked_fill(eye, float("inf")), [12, 12, 12], 4, unique=False)
    bare = sdk.create("sampler", NAME, k=4, with_views=False).pairs(v, sdk.Batch())
    assert torch.equal(bare.positive, want) and not (bare.positive & eye).any()
    assert torch.equal(bare.negative, ~want & ~eye)
    full = sdk.create("sampler", NAME, k=4).pairs(v, sdk.Batch())
    same = (torch.arange(12).repeat(3)[:, None] == torch.arange(12).repeat(3)[None, :]) & ~eye
    assert torch.equal(full.positive, want | same)
    scaled = sdk.Views(embeddings=[7 * e for e in v.embeddings])  # cosine: scale-free
    assert torch.equal(sdk.create("sampler", NAME, k=4).pairs(scaled, sdk.Batch()).positive, full.positive)


def test_it_trains_nt_xent_and_its_positives_raise_the_loss_over_plain_pairs():
    v = views(6)
    for e in v.embeddings:
        e.requires_grad_(True)
    with_atss = sdk.create("objective", "nt_xent", sampler=sdk.create("sampler", NAME))
    plain = sdk.create("objective", "nt_xent")
    loss = with_atss(v, sdk.Batch()).value
    loss.backward()
    assert all(torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0 for e in v.embeddings)
    # the neighbours it adds are harder positives than the augmented pair alone: 75 pairs
    # against 24, loss 2.010 against 1.758
    assert sdk.create("sampler", NAME).pairs(v, sdk.Batch()).positive.sum() > 24
    assert loss > plain(v, sdk.Batch()).value + 0.1


def test_bad_input():
    with pytest.raises(sdk.ConfigError, match="k must be >= 1"):
        sdk.create("sampler", NAME, k=0)
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}: scores must be floating \[G, A\]"):
        atss_select(torch.ones(3), torch.ones(3), [3])
    with pytest.raises(sdk.ShapeError, match="distances"):
        atss_select(torch.ones(2, 3), torch.ones(2, 4), [3])
    with pytest.raises(sdk.ShapeError, match="level_sizes"):
        atss_select(torch.ones(2, 3), torch.ones(2, 3), [2, 2])
    with pytest.raises(sdk.ShapeError, match="valid must be bool"):
        atss_select(torch.ones(2, 3), torch.ones(2, 3), [3], valid=torch.ones(2, 3))
    one = sdk.Views(embeddings=[torch.randn(1, 4)])
    with pytest.raises(sdk.ShapeError, match="at least 2 rows"):
        sdk.create("sampler", NAME).pairs(one, sdk.Batch())
