"""Objective algebra: weighted sums, logs per term, scheduled weights, merged requirements."""

import pytest
import torch

import sdk
from sdk.interfaces import Objective, Reweighter, Schedule


def _views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return sdk.Views(embeddings=(torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)),
                     logits=torch.randn(8, 3, generator=g))


def test_weighted_sum_value_and_logs():
    a = sdk.create("objective", "nt_xent")
    b = sdk.create("objective", "barlow_twins")
    views, batch = _views(), sdk.Batch()
    combo = 0.5 * a + b
    loss = combo(views, batch)
    va, vb = a(views, batch).value, b(views, batch).value
    assert torch.allclose(loss.value, 0.5 * va + vb)
    assert set(loss.logs) == {"nt_xent", "barlow_twins"}
    assert torch.allclose(loss.logs["nt_xent"], va) and torch.allclose(loss.logs["barlow_twins"], vb)
    assert combo.requires == {"views": 2}


def test_nested_scaling_and_sum_builtin():
    a = sdk.create("objective", "nt_xent", temperature=0.2)
    b = sdk.create("objective", "nt_xent", temperature=1.0)
    views = _views(1)
    combo = 2 * (0.5 * a + 3 * b)
    expected = a(views).value + 6 * b(views).value
    loss = combo(views)
    assert torch.allclose(loss.value, expected)
    assert set(loss.logs) == {"nt_xent", "nt_xent_2"}  # duplicate names are disambiguated
    assert torch.allclose(sum([a, b])(views).value, a(views).value + b(views).value)


def test_requirements_merge_and_checked_before_math():
    combo = sdk.create("objective", "nt_xent") + 0.1 * sdk.create("objective", "cross_entropy")
    assert combo.requires == {"views": 2, "logits": True, "targets": True}
    with pytest.raises(sdk.RequirementError, match="needs Batch.targets"):
        combo(_views(), sdk.Batch())


class Ramp(Schedule):
    def __call__(self, step, max_steps=None):
        return step / max_steps


def test_scheduled_weight_follows_progress():
    a = sdk.create("objective", "nt_xent")
    combo = Ramp() * a + sdk.create("objective", "barlow_twins")
    views = _views(2)
    combo.set_progress(25, 100)
    b = combo.terms[1](views).value
    assert torch.allclose(combo(views).value, 0.25 * a(views).value + b)
    combo.set_progress(100, 100)
    assert torch.allclose(combo(views).value, a(views).value + b)
    scaled = 3 * combo
    scaled.set_progress(50, 100)
    assert scaled.current_weights() == [1.5, 3.0]


def test_bad_weight_type():
    with pytest.raises(TypeError, match="objective weight must be a number or an sdk Schedule, got str"):
        "x" * sdk.create("objective", "nt_xent")


def test_per_sample_combines_when_all_terms_have_it():
    ce = sdk.create("objective", "cross_entropy")
    nt = sdk.create("objective", "nt_xent")
    batch = sdk.Batch(targets=torch.arange(8) % 3)
    views = _views(3)
    loss = (2 * ce + nt)(views, batch)
    expected = 2 * ce(views, batch).per_sample + nt(views, batch).per_sample
    assert torch.allclose(loss.per_sample, expected)
    bt = sdk.create("objective", "barlow_twins")
    assert (ce + bt)(views, batch).per_sample is None


class ByIndex(Reweighter):
    def weights(self, per_sample, batch):
        return (batch.index == 0).to(per_sample.dtype) * 3 + 1


def test_reweighter_reduce_is_weighted_mean():
    ps = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss = sdk.Loss(value=ps.mean(), per_sample=ps)
    out = ByIndex().reduce(loss, sdk.Batch(index=torch.arange(4)))
    assert torch.allclose(out.value, torch.tensor((4 * 1 + 2 + 3 + 4) / 7))
    assert torch.allclose(out.logs["unweighted"], ps.mean())
    with pytest.raises(sdk.RequirementError, match="needs Loss.per_sample"):
        ByIndex().reduce(sdk.Loss(value=ps.mean()), sdk.Batch(index=torch.arange(4)))


class Absolute(ByIndex):
    normalize = False


def test_a_reweighter_that_does_not_normalize_is_reduced_as_a_weighted_sum():
    ps = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = Absolute().reduce(sdk.Loss(value=ps.mean(), per_sample=ps), sdk.Batch(index=torch.arange(4)))
    assert torch.allclose(out.value, torch.tensor(4 * 1 + 2 + 3 + 4.0))


def test_objective_call_checks_argument_types():
    nt = sdk.create("objective", "nt_xent")
    with pytest.raises(TypeError, match="expected sdk.Views as first argument, got Tensor"):
        nt(torch.zeros(3, 3))
    with pytest.raises(sdk.ShapeError, match=r"Batch.index has 4 rows, but Views hold 8 samples"):
        nt(_views(), sdk.Batch(index=torch.arange(4)))


def test_unknown_requirement_key_is_rejected_at_class_creation():
    with pytest.raises(TypeError, match=r"requires: unknown keys \['label'\]"):
        class Bad(Objective):
            requires = {"label": True}

            def forward(self, views, batch):
                raise AssertionError
