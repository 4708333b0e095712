"""rogue_clean_guidance_consistency: the loss against a slow loop (value) and its closed-form
gradient, the clean-view targets detached, zero when the network is the guidance and nothing is
occluded, the feature weight's default; the occlusion transform's single rectangle covering
10-40%, pasted from another sample; and the measured effect on digits: occluded-test accuracy
clearly above the guidance network's."""

import copy

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.masked.rogue_clean_guidance_consistency import (
    RogueCleanGuidanceConsistency,
    RogueOcclusion,
)
from sdk import keys
from sdk.classification import FrozenTeacher

NAME = "rogue_clean_guidance_consistency"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _views(b=5, d=4, f=3, n=3, seed=0):
    g = _g(seed)
    out = tuple(torch.randn(b, d, generator=g).requires_grad_() for _ in range(n))
    feats = tuple(torch.randn(b, f, generator=g).requires_grad_() for _ in range(n))
    teacher = tuple(torch.randn(b, d, generator=g).requires_grad_() for _ in range(n))
    return out, feats, teacher


def _call(obj, out, feats, teacher):
    views = sdk.Views(embeddings=out, extras={keys.TEACHER: teacher, keys.FEATURES: feats})
    return obj(views, sdk.Batch(index=torch.arange(out[0].shape[0])))


def test_loss_equals_a_slow_loop_and_its_gradient_the_closed_form():
    out, feats, teacher = _views()
    lam = 0.7
    loss = _call(RogueCleanGuidanceConsistency(feature_weight=lam), out, feats, teacher)
    b, n = out[0].shape[0], len(out)
    o, h, g = ([t.tolist() for t in ts] for ts in (out, feats, teacher))
    slow = []
    for i in range(b):
        total = 0.0
        for v in range(1, n):
            total += sum((o[v][i][k] - g[0][i][k]) ** 2 for k in range(len(o[v][i])))
            total += lam * sum((h[v][i][k] - h[0][i][k]) ** 2 for k in range(len(h[v][i])))
        slow.append(total / (n - 1))
    assert torch.allclose(loss.per_sample, torch.tensor(slow), atol=1e-5)
    assert loss.value.item() == pytest.approx(sum(slow) / b, rel=1e-5)
    loss.value.backward()
    for v in range(1, n):
        assert torch.allclose(out[v].grad, 2 * (out[v] - teacher[0]).detach() / ((n - 1) * b), atol=1e-6)
        assert torch.allclose(feats[v].grad, 2 * lam * (feats[v] - feats[0]).detach() / ((n - 1) * b),
                              atol=1e-6)


def test_the_clean_view_guides_and_is_detached():
    out, feats, teacher = _views(seed=1)
    obj = RogueCleanGuidanceConsistency()
    loss = _call(obj, out, feats, teacher)
    loss.value.backward()
    # neither the guidance on the clean view nor the clean features receive a gradient
    assert teacher[0].grad is None and feats[0].grad is None
    # the guidance's output on the occluded views is not the target: changing it changes nothing
    other = (teacher[0], *(t + 5.0 for t in teacher[1:]))
    assert torch.equal(_call(obj, out, feats, other).per_sample, loss.per_sample)
    moved = (teacher[0] + 1.0, *teacher[1:])
    assert not torch.allclose(_call(obj, out, feats, moved).per_sample, loss.per_sample)


def test_zero_when_the_network_is_the_guidance_and_nothing_is_occluded():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU())
    net = torch.nn.Sequential(body, torch.nn.Linear(16, 10))
    teacher = FrozenTeacher(copy.deepcopy(net))
    x = torch.rand(8, 64)
    occluded = RogueOcclusion()(x, sdk.Batch(index=torch.arange(8)))[0]
    obj = sdk.create("objective", NAME)

    def loss(x1):
        return _call(obj, (net(x), net(x1)), (body(x), body(x1)), (teacher(x), teacher(x1)))

    assert torch.equal(loss(x).per_sample, torch.zeros(8))
    assert (loss(occluded).per_sample > 0).all()


def test_feature_weight_defaults_to_one_and_scales_the_feature_term():
    out, feats, teacher = _views(seed=2)
    default = _call(sdk.create("objective", NAME), out, feats, teacher)
    none = _call(RogueCleanGuidanceConsistency(feature_weight=0.0), out, feats, teacher)
    heavy = _call(RogueCleanGuidanceConsistency(feature_weight=2.5), out, feats, teacher)
    coefficient = default.logs["coefficient"]
    feature = default.value - coefficient
    assert feature > 0 and torch.allclose(default.logs["feature"], feature)
    assert torch.allclose(none.value, coefficient)
    assert torch.allclose(heavy.value, coefficient + 2.5 * feature)


def _occluded(x, out):
    return (out != x).any(1)  # [B, H, W]: where any channel changed


def test_occlusion_is_one_rectangle_covering_ten_to_forty_percent():
    t = sdk.create("transform", NAME, image_shape=(3, 32, 32))
    assert (t.min_fraction, t.max_fraction, t.fill, t.paste) == (0.1, 0.4, 0.0, False)
    x = torch.rand(400, 3, 32, 32, generator=_g(3)) + 1.0  # no pixel equals the fill 0
    torch.manual_seed(0)
    out, _ = t(x, sdk.Batch(index=torch.arange(400)))
    hit = _occluded(x, out)
    assert torch.equal((out == 0).all(1), hit) and torch.equal(out[~hit[:, None].expand_as(x)],
                                                              x[~hit[:, None].expand_as(x)])
    rows, cols = hit.any(2), hit.any(1)
    assert torch.equal(hit.sum((1, 2)), rows.sum(1) * cols.sum(1))  # its bounding box, filled
    frac = hit.float().mean((1, 2))
    assert frac.min() >= 0.1 - 0.02 and frac.max() <= 0.4 + 0.02  # whole-pixel rounding
    assert frac.min() < 0.12 and frac.max() > 0.38 and abs(frac.mean() - 0.25) < 0.01  # uniform
    ratio = rows.sum(1).float() / cols.sum(1)
    assert ratio.min() < 0.6 and ratio.max() > 1.7  # aspect ratio spread over [1/2, 2]
    fixed = RogueOcclusion((1, 32, 32), min_fraction=0.25, max_fraction=0.25)
    f = _occluded(x[:, :1], fixed(x[:, :1], sdk.Batch(index=torch.arange(400)))[0]).float().mean((1, 2))
    assert (f - 0.25).abs().max() < 0.02
    flat = sdk.create("transform", NAME)(torch.rand(4, 64) + 1, sdk.Batch(index=torch.arange(4)))[0]
    assert flat.shape == (4, 64) and ((flat == 0).float().mean(1) >= 0.09).all()


def test_paste_takes_the_same_pixels_of_another_sample():
    t = RogueOcclusion((2, 16, 16), paste=True)
    x = torch.rand(12, 2, 16, 16, generator=_g(4))
    torch.manual_seed(1)
    out, _ = t(x, sdk.Batch(index=torch.arange(12)))
    hit = _occluded(x, out)
    for i in range(12):
        m = hit[i]
        assert m.any()
        sources = [j for j in range(12) if torch.equal(out[i][:, m], x[j][:, m])]
        assert sources and i not in sources


def test_clear_errors():
    with pytest.raises(sdk.ConfigError, match="min_fraction"):
        RogueOcclusion(min_fraction=0.5, max_fraction=0.2)
    with pytest.raises(sdk.ConfigError, match="max_fraction"):
        RogueOcclusion(max_fraction=1.5)
    with pytest.raises(sdk.ShapeError, match=NAME):
        RogueOcclusion()(torch.rand(4, 60), sdk.Batch(index=torch.arange(4)))
    with pytest.raises(sdk.ShapeError, match="at least 2 rows"):
        RogueOcclusion(paste=True)(torch.rand(1, 64), sdk.Batch(index=torch.arange(1)))
    out, feats, teacher = _views()
    obj = RogueCleanGuidanceConsistency()
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}.*teacher.*\[5, 4\]"):
        _call(obj, out, feats, (teacher[0][:, :3], *teacher[1:]))
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}.*features"):
        _call(obj, out, feats[:1], teacher)
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}.*features.*\[2\]"):
        _call(obj, out, (*feats[:2], feats[2][:, :2]), teacher)


def test_digits_occluded_accuracy_rises_above_the_guidance_networks():
    """A guidance MLP trained on clean digits, then a copy trained with this loss on occluded
    copies (10-40%): on test digits with 30% of each image occluded it gains >= 5 points."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    for seed in (0, 1):
        torch.manual_seed(seed)
        perm = torch.randperm(len(x))
        tr, te = perm[:800], perm[800:]
        body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        net = torch.nn.Sequential(body, torch.nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), 2e-2)
        for _ in range(80):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[tr]), y[tr]).backward()
            opt.step()
        teacher, student = FrozenTeacher(copy.deepcopy(net)), copy.deepcopy(net)
        test_occ = RogueOcclusion(min_fraction=0.3, max_fraction=0.3)(x[te], sdk.Batch(index=te))[0]

        def acc(model, inputs, labels=y[te]):
            return (model(inputs).argmax(1) == labels).float().mean().item()

        before_clean, before_occ = acc(net, x[te]), acc(net, test_occ)
        occlude, obj = RogueOcclusion(), RogueCleanGuidanceConsistency()
        opt = torch.optim.Adam(student.parameters(), 2e-3)
        batch = sdk.Batch(index=tr)
        for _ in range(60):
            xo = occlude(x[tr], batch)[0]
            hc, ho = student[0](x[tr]), student[0](xo)
            views = sdk.Views(embeddings=(student[1](hc), student[1](ho)),
                              extras={keys.TEACHER: (teacher(x[tr]), teacher(xo)), keys.FEATURES: (hc, ho)})
            opt.zero_grad()
            obj(views, batch).value.backward()
            opt.step()
        assert acc(student, test_occ) >= before_occ + 0.05
        assert acc(student, x[te]) >= before_clean - 0.08  # measured drops of 4-6 points
