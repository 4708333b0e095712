"""glare_regional_consistency (GLARE): the three consistency terms against plain loops (value and
gradient, with a k-means written as loops), the centres' EMA after a training step, k-means
recovering planted regions, invariance of the loss to the order of the patches, defaults and
errors."""

import pytest
import torch

import sdk
from plugins.masked.glare_regional_consistency import kmeans_regions
from sdk import keys


def _inputs(b=3, p=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = tuple(torch.randn(b, k, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    t = tuple(torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(2))
    ps = torch.randn(b, p, k, generator=g, dtype=torch.float64).requires_grad_()
    pt = torch.randn(b, p, k, generator=g, dtype=torch.float64)
    return s, t, ps, pt


def _views(s, t, ps, pt):
    return sdk.Views(embeddings=s, extras={keys.TEACHER: t, keys.PATCHES: (ps, pt)})


def _ce(s, t, ts=0.1, tt=0.04):
    p = torch.softmax(t / tt, 0)
    return -sum(p[i] * torch.log_softmax(s / ts, 0)[i] for i in range(s.shape[0]))


def _slow_kmeans(x, r, iters):
    p = x.shape[0]
    mean = sum(x[i] for i in range(p)) / p
    gap = [float(((x[i] - mean) ** 2).sum()) for i in range(p)]
    centres = []
    for step in range(r):
        pick = max(range(p), key=lambda i: (gap[i], -i))
        centres.append(x[pick].clone())
        d = [float(((x[i] - x[pick]) ** 2).sum()) for i in range(p)]
        gap = d if step == 0 else [min(a, c) for a, c in zip(gap, d)]

    def assign():
        return [min(range(r), key=lambda c: (float((x[i] - centres[c]).norm()), c)) for i in range(p)]

    a = assign()
    for _ in range(iters):
        for c in range(r):
            members = [x[i] for i in range(p) if a[i] == c]
            if members:
                centres[c] = sum(members) / len(members)
        a = assign()
    return a


def _slow_loss(s, t, ps, pt, r=4, iters=10, w=(1.0, 1.0, 1.0)):
    out = []
    for i in range(s[0].shape[0]):
        g = 0.5 * (_ce(s[0][i], t[1][i]) + _ce(s[1][i], t[0][i]))
        p = ps.shape[1]
        loc = sum(_ce(ps[i, j], pt[i, j]) for j in range(p)) / p
        a = _slow_kmeans(pt[i], r, iters)
        regs = []
        for c in range(r):
            members = [j for j in range(p) if a[j] == c]
            if members:
                ms = sum(ps[i, j] for j in members) / len(members)
                mt = sum(pt[i, j] for j in members) / len(members)
                regs.append(_ce(ms, mt))
        out.append(w[0] * g + w[1] * loc + w[2] * sum(regs) / len(regs))
    return torch.stack(out)


def test_terms_equal_plain_loops_value_and_gradient():
    s, t, ps, pt = _inputs()
    obj = sdk.create("objective", "glare_regional_consistency", regions=3, local_weight=0.5,
                     region_weight=2.0)
    for i in range(3):
        assert kmeans_regions(pt[i:i + 1], 3, 10)[0].tolist() == _slow_kmeans(pt[i], 3, 10)
    obj.eval()  # no centre update
    loss = obj(_views(s, t, ps, pt), sdk.Batch(index=torch.arange(3)))
    slow = _slow_loss(s, t, ps, pt, r=3, w=(1.0, 0.5, 2.0))
    torch.testing.assert_close(loss.per_sample, slow)
    got = torch.autograd.grad(loss.value, (*s, ps))
    want = torch.autograd.grad(slow.mean(), (*s, ps))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # each term on its own
    for name, w in (("global", (1, 0, 0)), ("local", (0, 1, 0)), ("regional", (0, 0, 1))):
        torch.testing.assert_close(loss.logs[name], _slow_loss(s, t, ps, pt, r=3, w=w).mean().detach())


def test_centres_follow_the_teacher_by_ema_and_centre_the_next_step():
    s, t, ps, pt = _inputs()
    obj = sdk.create("objective", "glare_regional_consistency")
    obj.train()
    obj(_views(s, t, ps, pt), sdk.Batch(index=torch.arange(3)))
    c = 0.1 * torch.cat(t).mean(0)
    cp = 0.1 * pt.reshape(-1, 4).mean(0)
    torch.testing.assert_close(obj.center.center.double(), c, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(obj.patch_center.center.double(), cp, rtol=1e-6, atol=1e-7)
    obj.eval()
    loss = obj(_views(s, t, ps, pt), sdk.Batch(index=torch.arange(3)))
    c32, cp32 = obj.center.center.double(), obj.patch_center.center.double()
    want = _slow_loss(s, tuple(x - c32 for x in t), ps, pt - cp32)
    # k-means runs on the raw teacher patches; centring shifts them all alike: same regions
    torch.testing.assert_close(loss.per_sample, want)


def test_kmeans_recovers_planted_regions_and_the_loss_ignores_patch_order():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 8, generator=g) * 10
    truth = torch.arange(16) % 4
    x = means[truth] + 0.1 * torch.randn(16, 8, generator=g)
    got = kmeans_regions(x[None], 4, 10)[0]
    for a in range(16):
        for b in range(16):
            assert (got[a] == got[b]) == (truth[a] == truth[b])
    s, t, ps, pt = _inputs(b=4, p=9, seed=2)
    obj = sdk.create("objective", "glare_regional_consistency").eval()
    perm = torch.randperm(9, generator=g)
    a = obj(_views(s, t, ps, pt), sdk.Batch(index=torch.arange(4)))
    b = obj(_views(s, t, ps[:, perm], pt[:, perm]), sdk.Batch(index=torch.arange(4)))
    torch.testing.assert_close(a.per_sample, b.per_sample)


def test_defaults_and_errors():
    obj = sdk.create("objective", "glare_regional_consistency")
    assert (obj.student_temp, obj.teacher_temp, obj.center.momentum, obj.regions,
            obj.kmeans_iterations, obj.weights, obj.gather) == (0.1, 0.04, 0.9, 4, 10,
                                                                (1.0, 1.0, 1.0), "auto")
    s, t, ps, pt = _inputs()
    with pytest.raises(sdk.ShapeError, match="glare_regional_consistency.*patches"):
        obj(_views(s, t, ps[:, :, :3], pt), sdk.Batch(index=torch.arange(3)))
    with pytest.raises(sdk.ShapeError, match="glare_regional_consistency.*teacher"):
        obj(_views(s, (t[0],), ps, pt), sdk.Batch(index=torch.arange(3)))
    with pytest.raises(sdk.ConfigError):
        sdk.create("objective", "glare_regional_consistency", teacher_temp=0.0)


def test_lloyd_steps_move_a_patch_and_empty_regions_do_not_count():
    x = torch.tensor([0.0, 4.4, 4.6, 9.0, 9.0, 9.0, 30.0], dtype=torch.float64)[None, :, None]
    start = kmeans_regions(x, 3, 0)[0].tolist()
    done = kmeans_regions(x, 3, 10)[0].tolist()
    assert start[2] == start[3] and done[2] == done[0] != done[3]  # 4.6 moves to the 0 cluster
    assert done == _slow_kmeans(x[0], 3, 10)
    # two distinct teacher patches and four regions: two regions stay empty and are not averaged
    s, t, ps, _ = _inputs(b=2, p=6)
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    pt = rows[:, [0, 0, 0, 1, 1, 1]]
    obj = sdk.create("objective", "glare_regional_consistency").eval()
    assert sorted(set(kmeans_regions(pt, 4, 10)[0].tolist())) == [0, 1]
    loss = obj(_views(s, t, ps, pt), sdk.Batch(index=torch.arange(2)))
    torch.testing.assert_close(loss.per_sample, _slow_loss(s, t, ps, pt))
