"""Regression tests for the defects the fuzzed conformance inputs found: each input used to end
in an error from inside torch, a NaN, or a silent wrong index; now a paperplug error names the
plugin and the field."""

import math

import pytest
import torch

import sdk
from sdk.types import Batch, Views


def _views(b=4, d=8, n=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return Views(embeddings=tuple(torch.randn(b, d, generator=g, dtype=dtype) for _ in range(n)))


@pytest.mark.parametrize(("views", "match"), [
    (Views(embeddings=(torch.ones(4, 8, dtype=torch.long),) * 2),
     r"objective 'nt_xent': Views.embeddings\[0\] must be floating point, got torch.int64"),
    (_views(b=0), r"objective 'nt_xent': empty batch"),
])
def test_objectives_check_dtype_and_empty_batch_before_any_math(views, match):
    with pytest.raises(sdk.ShapeError, match=match):
        sdk.create("objective", "nt_xent")(views, Batch())


def test_a_batch_size_mismatch_names_the_field():
    with pytest.raises(sdk.ShapeError, match=r"'barlow_twins': Batch.targets has 5 rows, but Views hold 4"):
        sdk.create("objective", "barlow_twins")(_views(), Batch(targets=torch.zeros(5, dtype=torch.long)))


@pytest.mark.parametrize("name", ["decoupled_contrastive", "groco", "isogclr"])
def test_a_batch_of_one_without_negatives_is_refused(name):
    obj = sdk.create("objective", name)
    with pytest.raises(sdk.ShapeError, match=rf"objective '{name}' needs negatives: a batch of at least 2"):
        obj(_views(b=1), Batch(index=torch.zeros(1, dtype=torch.long)))
    loss = obj(_views(b=2), Batch(index=torch.arange(2)))  # two samples are enough
    assert torch.isfinite(loss.value)


@pytest.mark.parametrize("bad", [-1, 10])
def test_isogclr_refuses_an_index_outside_its_buffers(bad):
    obj = sdk.create("objective", "isogclr", num_samples=10)
    with pytest.raises(sdk.ShapeError, match=r"'isogclr': Batch.index must lie in \[0, 10\)"):
        obj(_views(), Batch(index=torch.tensor([0, 1, 2, bad])))


@pytest.mark.parametrize(("targets", "match"), [
    (torch.tensor([0, 1, 5, 2]), r"cross_entropy: Batch.targets must lie in \[0, 5\), got ids in \[0, 5\]"),
    (torch.tensor([0, 1, -1, 2]), r"cross_entropy: Batch.targets must lie in \[0, 5\)"),
    (torch.zeros(4, 1, 1, dtype=torch.long), r"cross_entropy: Batch.targets must be class ids \[B\] or soft labels"),
])
def test_cross_entropy_checks_its_targets(targets, match):
    views = Views(logits=torch.randn(4, 5))
    with pytest.raises(sdk.ShapeError, match=match):
        sdk.create("objective", "cross_entropy")(views, Batch(targets=targets))


def test_core_tuning_checks_class_ids_against_the_logits():
    views = Views(embeddings=(torch.randn(4, 8),), logits=torch.randn(4, 3))
    with pytest.raises(sdk.ShapeError, match=r"'core_tuning': Batch.targets must lie in \[0, 3\)"):
        sdk.create("objective", "core_tuning")(views, Batch(targets=torch.tensor([0, 1, 2, 3])))


def test_check_ids_checks_dtype_and_rank_and_with_a_bound_the_range():
    sdk.types.check_ids("p", "f", torch.tensor([0, 9]))  # no bound: metadata only
    with pytest.raises(sdk.ShapeError, match=r"p: f must be integer ids \[B\], got torch.float32"):
        sdk.types.check_ids("p", "f", torch.tensor([0.0, 2.0]))
    with pytest.raises(sdk.ShapeError, match=r"p: f must lie in \[0, 3\), got ids in \[0, 9\]"):
        sdk.types.check_ids("p", "f", torch.tensor([0, 9]), 3)


@pytest.mark.parametrize(("name", "params"), [("mlp", {"in_dim": 8}), ("projection_head", {"in_dim": 8})])
def test_encoders_check_their_input(name, params):
    enc = sdk.create("encoder", name, **params)
    with pytest.raises(sdk.ShapeError, match=rf"encoder '{name}': x.* has 1 row, but batch norm in training"):
        enc(torch.randn(1, 8))
    with pytest.raises(sdk.ShapeError, match=r"is torch.float64 but the parameters are torch.float32"):
        enc(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(sdk.ShapeError, match=rf"encoder '{name}': x"):
        enc(torch.ones(4, 8, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc(torch.randn(4, 8)).shape == (4, enc.out_dim)
    assert enc.eval()(torch.randn(1, 8)).shape == (1, enc.out_dim)  # batch norm uses running statistics


def test_mlp_refuses_an_input_without_a_batch_dimension():
    with pytest.raises(sdk.ShapeError, match=r"encoder 'mlp': x must be a batch \[B, \.\.\.\] of 8 features"):
        sdk.create("encoder", "mlp", in_dim=8)(torch.randn(8))


def test_adaptive_multihead_refuses_one_sample_in_training():
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=8)
    with pytest.raises(sdk.ShapeError, match=r"'adaptive_multihead_contrastive': Views.embeddings has 1 row"):
        obj(_views(b=1), Batch())


@pytest.mark.parametrize("name", ["same_index", "label_positives", "meow_weighted_negatives"])
def test_samplers_check_batch_size_dtype_and_emptiness(name):
    sampler = sdk.create("sampler", name)
    batch = Batch(targets=torch.zeros(5, dtype=torch.long))
    with pytest.raises(sdk.ShapeError, match=rf"sampler '{name}': Batch.targets has 5 rows, but Views hold 4"):
        sampler.pairs(_views(), batch)
    ints = Views(embeddings=(torch.ones(4, 8, dtype=torch.long),) * 2)
    with pytest.raises(sdk.ShapeError, match=rf"sampler '{name}': Views.embeddings\[0\] must be floating"):
        sampler.pairs(ints, Batch(targets=torch.zeros(4, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match=rf"sampler '{name}': empty batch"):
        sampler.pairs(_views(b=0), Batch(targets=torch.zeros(0, dtype=torch.long)))


def test_transforms_check_their_batch():
    mixup = sdk.create("transform", "mixup", num_classes=3)
    with pytest.raises(sdk.ShapeError, match=r"transform 'mixup': Batch.targets has 5 rows, but x has 4"):
        mixup(torch.randn(4, 8), Batch(targets=torch.zeros(5, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match=r"transform 'mixup': x must be a batch tensor \[B, \.\.\.\], got \[\]"):
        mixup(torch.tensor(1.0), Batch())
    bss = sdk.create("transform", "batch_style_standardization")
    with pytest.raises(sdk.ShapeError, match=r"transform 'batch_style_standardization': empty batch"):
        bss(torch.randn(0, 3, 4, 4), Batch())


def test_group_dro_raises_a_shape_error_naming_itself():
    rw = sdk.create("reweighter", "group_dro")
    per = torch.rand(4)
    with pytest.raises(sdk.ShapeError, match=r"reweighter 'group_dro': Batch.domain holds group ids in \[-1, 0\]"):
        rw.reduce(sdk.Loss(value=per.mean(), per_sample=per), Batch(domain=torch.tensor([0, -1, 0, 0])))


@pytest.mark.parametrize(("scores", "labels", "match"), [
    (torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]), r"labels must lie in \[0, 3\), got class ids in \[0, 3\]"),
    (torch.randn(6, 3), torch.zeros(6), r"labels must be integer class ids \[6\], got torch.float32"),
    (torch.randn(6, 3), torch.zeros(5, dtype=torch.long), r"labels must be integer class ids \[6\]"),
    (torch.ones(6, 3, dtype=torch.long), torch.zeros(6, dtype=torch.long), r"fit's scores must be floating logits"),
    (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), r"fit's scores are empty"),
])
def test_calibrators_check_scores_and_labels_before_fitting(scores, labels, match):
    with pytest.raises(sdk.ShapeError, match=rf"calibrator 'temperature_scaling': {match}"):
        sdk.create("calibrator", "temperature_scaling").fit(scores, labels)


@pytest.mark.parametrize("name", ["knn_accuracy", "linear_probe"])
def test_probes_refuse_negative_class_ids(name):
    z = torch.randn(6, 4)
    with pytest.raises(sdk.ShapeError, match=rf"{name}: labels of train_emb must be class ids >= 0, got -1"):
        sdk.create("metric", name).fit(z, torch.tensor([0, 1, -1, 0, 1, 0]))


def test_linear_probe_refuses_test_embeddings_of_another_width():
    probe = sdk.create("metric", "linear_probe").fit(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(sdk.ShapeError, match=r"linear_probe: test_emb \[6, 3\] differs in dimension"):
        probe.update(torch.randn(6, 3), torch.zeros(6, dtype=torch.long))


def test_rankme_of_only_empty_batches_is_nan_like_no_batch():
    metric = sdk.create("metric", "rankme")
    metric.update(torch.randn(0, 4))
    assert math.isnan(metric.compute())


@pytest.mark.parametrize("name", ["ece", "mce", "classwise_ece"])
def test_binned_metrics_name_themselves_in_errors(name):
    probs = torch.softmax(torch.randn(6, 3), dim=1)
    with pytest.raises(sdk.ShapeError, match=rf"^{name}: labels must be \[6\] class ids, got \[5\]"):
        sdk.create("metric", name).update(probs, torch.zeros(5, dtype=torch.long))
