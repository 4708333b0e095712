"""DINO against an explicit float64 loop (value and gradient), its centre, its teacher
temperature schedule and resume."""

import math

import pytest
import torch

import sdk
from sdk import keys
from sdk.testing import check_resume


def slow(student, teacher, center, ts=0.1, tt=0.04):
    """Scalar loops over the (global teacher view, other student view) pairs."""
    b, k = student[0].shape
    terms = []
    center = center.detach()
    for i, t in enumerate(teacher):
        t = t.detach()
        for v, s in enumerate(student):
            if v == i:
                continue
            h = 0
            for r in range(b):
                e = [math.exp((float(t[r, j]) - float(center[j])) / tt) for j in range(k)]
                q = [x / sum(e) for x in e]
                lse = torch.log(sum(torch.exp(s[r, j] / ts) for j in range(k)))
                h = h - sum(q[j] * (s[r, j] / ts - lse) for j in range(k)) / b
            terms.append(h)
    return sum(terms) / len(terms)


def _inputs(v=3, n=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = tuple(torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_() for _ in range(v))
    t = tuple(torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_() for _ in range(v))
    return s, t


@pytest.mark.parametrize("views", [2, 4])
def test_value_and_gradient_match_the_loop_and_the_centre_moves_after(views):
    obj = sdk.create("objective", "dino")
    s, t = _inputs(views)
    zero = torch.zeros(5, dtype=torch.float64)
    loss = obj(sdk.Views(embeddings=s, extras={keys.TEACHER: t})).value
    want = slow(s, t[:2], zero)
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    for a, b in zip(torch.autograd.grad(loss, s), torch.autograd.grad(want, s)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # the centre is updated after the loss, from the global teacher views only
    c1 = 0.1 * torch.cat(t[:2]).detach().mean(0)
    torch.testing.assert_close(obj.center.center.double(), c1, rtol=1e-6, atol=1e-7)
    s2, t2 = _inputs(views, seed=1)
    loss2 = obj(sdk.Views(embeddings=s2, extras={keys.TEACHER: t2})).value
    assert loss2.item() == pytest.approx(slow(s2, t2[:2], c1).item(), rel=1e-6)
    # the teacher receives no gradient
    assert torch.autograd.grad(obj(sdk.Views(embeddings=s, extras={keys.TEACHER: t})).value, t,
                               allow_unused=True) == (None,) * views


def test_paper_defaults_and_the_centre_is_frozen_in_evaluation():
    obj = sdk.create("objective", "dino")
    assert (obj.student_temp, obj.teacher_temp, obj.center.momentum, obj.n_global) == (0.1, 0.04, 0.9, 2)
    obj.eval()
    s, t = _inputs()
    obj(sdk.Views(embeddings=s, extras={keys.TEACHER: t}))
    assert obj.center.center.numel() == 0


def test_teacher_temperature_warms_up_with_the_steps():
    s, t = _inputs(2)
    zero = torch.zeros(5)
    for step, temp in [(0, 0.04), (5, 0.055), (10, 0.07), (50, 0.07)]:
        fresh = sdk.create("objective", "dino", warmup_teacher_temp=0.04, teacher_temp=0.07,
                           warmup_steps=10)
        fresh.set_progress(step, 100)
        loss = fresh(sdk.Views(embeddings=s, extras={keys.TEACHER: t}))
        assert loss.logs["teacher_temp"].item() == pytest.approx(temp)
        assert loss.value.item() == pytest.approx(slow(s, t, zero, tt=temp).item(), rel=1e-8)
    with pytest.raises(sdk.ConfigError, match="warmup_teacher_temp and warmup_steps"):
        sdk.create("objective", "dino", warmup_steps=10)
    with pytest.raises(sdk.ConfigError, match="warmup_teacher_temp and warmup_steps"):
        sdk.create("objective", "dino", warmup_teacher_temp=0.04)


def test_errors_name_the_objective():
    s, t = _inputs(2)
    obj = sdk.create("objective", "dino", n_global=3)
    with pytest.raises(sdk.RequirementError, match="'dino'.*n_global=3"):
        obj(sdk.Views(embeddings=s, extras={keys.TEACHER: t}))
    obj = sdk.create("objective", "dino")
    obj(sdk.Views(embeddings=s, extras={keys.TEACHER: t}))
    wide = tuple(torch.randn(4, 6) for _ in range(2))
    with pytest.raises(sdk.ShapeError, match="'dino'.*6 dimensions.*has 5"):
        obj(sdk.Views(embeddings=wide, extras={keys.TEACHER: wide}))


def test_resume_restores_the_centre(tmp_path):
    runs = check_resume(objective=lambda: sdk.create("objective", "dino"),
                        teacher=lambda: sdk.create("teacher", "ema"), tmp_dir=tmp_path)
    assert runs.straight.objective.center.center.abs().sum() > 0
