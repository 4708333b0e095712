"""ema teacher: the EMA update and BYOL's cosine momentum schedule, by hand."""

import math

import pytest
import torch

import sdk
from sdk.momentum import cosine_momentum


def test_update_is_exponential_moving_average():
    student = sdk.create("encoder", "mlp", in_dim=4, out_dim=3)
    teacher = sdk.create("teacher", "ema", momentum=0.9, final_momentum=0.9)
    teacher.attach(student)
    before = [p.clone() for p in teacher.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        for b in student.buffers():
            b.add_(2)
    teacher.update(student=student, step=3, max_steps=10)
    for t, old, s in zip(teacher.target.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * s)
        assert not t.requires_grad
    for t, s in zip(teacher.target.buffers(), student.buffers()):
        assert torch.equal(t, s)


def test_cosine_schedule_values():
    assert cosine_momentum(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 1.0, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 1.0, 50, 100) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)
    assert cosine_momentum(0.99, 1.0, 5, None) == 0.99


def test_needs_student():
    with pytest.raises(sdk.RequirementError, match="teacher 'ema': no student attached"):
        sdk.create("teacher", "ema")(torch.zeros(2, 64))
    with pytest.raises(sdk.RequirementError, match="teacher 'queue': update.. needs student="):
        sdk.create("teacher", "queue", student=torch.nn.Linear(3, 2)).update(student=None)


def test_another_student_is_named_not_blended():
    teacher = sdk.create("teacher", "ema", student=torch.nn.Linear(3, 2))
    with pytest.raises(sdk.ShapeError, match=r"teacher 'ema': the student's parameter #0 has shape \[4, 3\]"):
        teacher.update(student=torch.nn.Linear(3, 4))
    with pytest.raises(sdk.ShapeError, match="teacher 'ema': the student has 4 parameters"):
        teacher.update(student=torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)))
