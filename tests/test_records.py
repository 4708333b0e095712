"""Records validate types and batch sizes and name the field at fault."""

import pytest
import torch

import sdk


def test_views_properties():
    v = sdk.Views(embeddings=(torch.zeros(4, 3), torch.zeros(4, 3)), logits=torch.zeros(4, 2))
    assert v.n_views == 2 and v.batch_size == 4


def test_views_reject_mismatched_views():
    with pytest.raises(sdk.ShapeError, match=r"embeddings\[0\]=\[4, 3\], embeddings\[1\]=\[5, 3\]"):
        sdk.Views(embeddings=(torch.zeros(4, 3), torch.zeros(5, 3)))


def test_views_reject_non_2d_and_single_tensor():
    with pytest.raises(sdk.ShapeError, match=r"Views.embeddings\[0\]: expected shape \[B, D\], got \[4\]"):
        sdk.Views(embeddings=(torch.zeros(4),))
    with pytest.raises(TypeError, match="wrap it"):
        sdk.Views(embeddings=torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"Views.embeddings\[1\]: expected a torch.Tensor, got list"):
        sdk.Views(embeddings=(torch.zeros(4, 3), [1, 2]))


def test_views_logits_batch_size():
    with pytest.raises(sdk.ShapeError, match="Views.logits: batch size 3 does not match"):
        sdk.Views(embeddings=(torch.zeros(4, 3),), logits=torch.zeros(3, 2))


def test_batch_fields_disagree():
    with pytest.raises(sdk.ShapeError, match=r"Batch: fields disagree on the batch size \(targets=4, index=5\)"):
        sdk.Batch(targets=torch.zeros(4, dtype=torch.long), index=torch.arange(5))


def test_batch_types():
    with pytest.raises(TypeError, match="Batch.index: expected an integer tensor"):
        sdk.Batch(index=torch.zeros(3))
    with pytest.raises(TypeError, match="Batch.targets: expected a torch.Tensor or None, got list"):
        sdk.Batch(targets=[1, 2])
    with pytest.raises(sdk.ShapeError, match=r"Batch.weight: expected shape \[B\]"):
        sdk.Batch(weight=torch.ones(3, 2))


def test_records_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        sdk.Batch(torch.zeros(3))
    b = sdk.Batch(extras={"a": 1})
    with pytest.raises(TypeError):
        b.extras["b"] = 2
    with pytest.raises(AttributeError):
        b.targets = None


def test_loss_validation():
    with pytest.raises(sdk.ShapeError, match=r"Loss.value: expected a scalar \(0-dim\) tensor, got \[2\]"):
        sdk.Loss(value=torch.zeros(2))
    with pytest.raises(TypeError, match="Loss.value"):
        sdk.Loss(value=1.0)
    with pytest.raises(sdk.ShapeError, match="Loss.per_sample"):
        sdk.Loss(value=torch.zeros(()), per_sample=torch.zeros(2, 2))


def test_pairs_validation():
    m = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="Pairs.positive: expected dtype torch.bool"):
        sdk.Pairs(positive=m.float(), negative=m)
    with pytest.raises(sdk.ShapeError, match="masks differ in shape"):
        sdk.Pairs(positive=m, negative=m[:, :2])
    with pytest.raises(sdk.ShapeError, match="Pairs.weight"):
        sdk.Pairs(positive=m, negative=m, weight=torch.ones(3, 3))
    with pytest.raises(sdk.ShapeError, match="Pairs.extra_negatives"):
        sdk.Pairs(positive=m, negative=m, extra_negatives=torch.ones(2, 5, 7))
    extra = torch.ones(3, 5, 7)
    with pytest.raises(sdk.ShapeError, match="Pairs.extra_negative_mask"):
        sdk.Pairs(positive=m, negative=m, extra_negatives=extra,
                  extra_negative_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="without extra_negatives"):
        sdk.Pairs(positive=m, negative=m, extra_negative_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(sdk.ShapeError, match="Pairs.extra_negative_mask: expected shape \\[3, 5\\]"):
        sdk.Pairs(positive=m, negative=m, extra_negative_sims=torch.ones(3, 5),
                  extra_negative_mask=torch.ones(3, 4, dtype=torch.bool))


def test_masked_extra_negatives_leave_the_denominator():
    from sdk import contrastive

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    c = contrastive.contrast(sdk.Views(embeddings=(z1, z2)), sdk.Batch())
    extra = torch.nn.functional.normalize(torch.randn(8, 2, 3, generator=g), dim=-1)
    keep = torch.tensor([True, False]).repeat(8, 1)
    m = torch.ones(8, 8, dtype=torch.bool)
    masked, mask = contrastive.extra_negatives(
        c, sdk.Pairs(positive=m, negative=m, extra_negatives=extra, extra_negative_mask=keep))
    assert torch.equal(mask, keep)
    assert torch.allclose(masked, torch.einsum("ad,amd->am", c.anchors, extra))
    sims = torch.einsum("ad,amd->am", c.anchors, extra)  # the same negatives as similarities only
    both, mask = contrastive.extra_negatives(
        c, sdk.Pairs(positive=m, negative=m, extra_negative_sims=sims, extra_negative_mask=keep))
    assert torch.equal(mask, keep) and torch.equal(both, sims)
