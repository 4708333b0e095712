"""weak_strong_consistency: the loss equals a per-sample loop of the teacher-to-student KL on
the kept rows plus the pseudo-label supervised contrast written out pair by pair (value and
gradient), the teacher gets no gradient, a threshold no teacher reaches gives 0, and the
defaults are the authors' code's (T = 0.07, every row kept)."""

import math

import pytest
import torch

import sdk
from sdk import keys
from sdk.types import Batch, Views


def inputs(seed, b=8, c=3, d=4):
    g = torch.Generator().manual_seed(seed)
    weak = torch.randn(b, c, generator=g, dtype=torch.float64)
    strong = torch.randn(b, c, generator=g, dtype=torch.float64).requires_grad_()
    teacher = (2 * torch.randn(b, c, generator=g, dtype=torch.float64)).requires_grad_()
    feats = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    return weak, strong, teacher, feats


def views_of(weak, strong, teacher, feats=None):
    extras = {keys.TEACHER: (teacher, teacher.detach() + 1)}
    if feats is not None:
        extras[keys.FEATURES] = (torch.zeros_like(feats), feats)
    return Views(embeddings=(weak, strong), extras=extras)


def slow(strong, teacher, feats, tau, temperature, lam):
    b = len(strong)
    pt = [torch.softmax(teacher[i].detach(), 0) for i in range(b)]
    ps = [torch.softmax(strong[i], 0) for i in range(b)]
    kept = [float(p.max()) >= tau for p in pt]
    label = [int(p.argmax()) for p in pt]
    kl = sum(sum(pt[i][c] * (torch.log(pt[i][c]) - torch.log(ps[i][c])) for c in range(len(pt[i])))
             for i in range(b) if kept[i])
    f = [feats[i] / feats[i].norm() for i in range(b)]
    terms = []
    for i in range(b):
        pos = [p for p in range(b) if p != i and kept[p] and kept[i] and label[p] == label[i]]
        if not pos:
            continue
        den = torch.log(sum(torch.exp(f[i] @ f[a] / temperature) for a in range(b) if a != i and kept[a]))
        terms.append(-sum(f[i] @ f[p] / temperature - den for p in pos) / len(pos))
    contrast = sum(terms) / len(terms) if terms else 0.0
    return kl / b + lam * contrast, len(terms)


@pytest.mark.parametrize(("tau", "temperature", "lam"), [(0.0, 0.07, 1.0), (0.6, 0.5, 0.3)])
def test_equals_the_slow_loop_with_gradient(tau, temperature, lam):
    weak, strong, teacher, feats = inputs(0)
    obj = sdk.create("objective", "weak_strong_consistency", threshold=tau, temperature=temperature,
                     contrast_weight=lam)
    loss = obj(views_of(weak, strong, teacher, feats), Batch())
    want, anchors = slow(strong, teacher, feats, tau, temperature, lam)
    assert anchors >= 3  # the contrast really counts
    # the contrast is computed in float32 (sdk.contrastive.info_nce), the rest in float64
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.per_sample.mean().item() == pytest.approx(want.item(), rel=1e-6)
    got_g = torch.autograd.grad(loss.value, [strong, feats])
    want_g = torch.autograd.grad(want, [strong, feats])
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7) and b.abs().max() > 1e-4
    (g_teacher,) = torch.autograd.grad(loss.value, [teacher], allow_unused=True)
    assert g_teacher is None  # the teacher is a target, never trained through the loss


def test_strong_scores_are_the_features_without_a_features_entry():
    weak, strong, teacher, _ = inputs(1)
    obj = sdk.create("objective", "weak_strong_consistency")
    loss = obj(views_of(weak, strong, teacher), Batch())
    want, _ = slow(strong, teacher, strong, 0.0, 0.07, 1.0)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-6)


def test_threshold_no_teacher_reaches_gives_zero_and_identical_views_no_consistency():
    weak, strong, teacher, feats = inputs(2)
    obj = sdk.create("objective", "weak_strong_consistency", threshold=1.0)
    loss = obj(views_of(weak, strong, teacher, feats), Batch())
    assert loss.value.item() == 0.0 and loss.logs["kept"].item() == 0.0
    obj = sdk.create("objective", "weak_strong_consistency", contrast_weight=0.0)
    same = obj(views_of(weak, teacher.detach().clone(), teacher, feats), Batch())
    assert same.value.item() == pytest.approx(0.0, abs=1e-12)  # student = teacher: KL 0


def test_defaults():
    obj = sdk.create("objective", "weak_strong_consistency")
    assert (obj.threshold, obj.temperature, obj.contrast_weight) == (0.0, 0.07, 1.0)
    assert math.isclose(obj.temperature, 0.07)


def test_bad_inputs_are_named():
    weak, strong, teacher, feats = inputs(3)
    obj = sdk.create("objective", "weak_strong_consistency")
    with pytest.raises(sdk.RequirementError, match="'weak_strong_consistency' needs extras\\['teacher'\\]"):
        obj(Views(embeddings=(weak, strong)), Batch())
    with pytest.raises(sdk.ShapeError, match=r"teacher on the weak view\) must be floating \[8, 3\].*\[8, 2\]"):
        obj(views_of(weak, strong, teacher[:, :2]), Batch())
    with pytest.raises(sdk.ShapeError, match=r"features'\]\[1\] must be floating \[8, D\], got \[7, 4\]"):
        obj(views_of(weak, strong, teacher, feats[:7]), Batch())
    with pytest.raises(sdk.ConfigError, match="temperature"):
        sdk.create("objective", "weak_strong_consistency", temperature=0.0)
