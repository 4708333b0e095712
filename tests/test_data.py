"""Digits splits (stratified, disjoint, seeded) and tensor augmentations (label-preserving,
seeded, doing what they say)."""

from __future__ import annotations

import pytest
import torch

from sdk import data
from sdk.errors import ConfigError, ShapeError
from sdk.types import Batch


@pytest.fixture(scope="module")
def splits():
    return data.load("digits", calibration_fraction=0.2, test_fraction=0.2, seed=0)


def test_splits_are_disjoint_cover_the_dataset_and_are_stratified(splits):
    parts = (splits.train, splits.calibration, splits.test)
    index = torch.cat([p.index for p in parts])
    assert index.numel() == 1797 and index.unique().numel() == 1797
    full_y = torch.empty(1797, dtype=torch.long)
    for p in parts:
        full_y[p.index] = p.y
    per_class = torch.bincount(full_y, minlength=10).float()
    for p, fraction in ((splits.calibration, 0.2), (splits.test, 0.2), (splits.train, 0.6)):
        counts = torch.bincount(p.y, minlength=10).float()
        assert (counts - fraction * per_class).abs().max() <= 1.0  # rounding per class only
    assert splits.num_classes == 10 and splits.in_dim == 64 and splits.image_shape == (8, 8)
    assert 0 <= float(splits.train.x.min()) and float(splits.train.x.max()) <= 1


def test_splits_depend_on_the_seed_only():
    a, b, c = (data.load("digits", seed=s).test.index for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tabular_data_is_standardised_with_training_statistics():
    s = data.load("wine")
    assert torch.allclose(s.train.x.mean(0), torch.zeros(13), atol=1e-5)
    assert s.image_shape is None and s.num_classes == 3
    with pytest.raises(ConfigError, match="shift needs image data"):
        data.augmentation(image_shape=None, shift=1)


def test_split_fraction_and_dataset_errors():
    with pytest.raises(ConfigError, match="sum to < 1"):
        data.stratified_split(torch.zeros(10), [0.5, 0.5])
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        data.load("mnist")


def augment():
    return data.augmentation(image_shape=(8, 8), shift=1, scale=0.2, mask=0.2, noise=0.1)


def test_augmentation_is_label_preserving_and_seeded(splits):
    x, y, idx = splits.train.tensors
    batch = Batch(targets=y, index=idx)
    torch.manual_seed(3)
    a, batch_a = augment()(x, batch)
    torch.manual_seed(3)
    b, _ = augment()(x, batch)
    c, _ = augment()(x, batch)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(batch_a.targets, y) and torch.equal(batch_a.index, idx)
    assert not torch.allclose(a, x)


def test_augmented_views_keep_the_class(splits):
    """5-NN over augmented training views recognises augmented held-out views far above chance
    (0.1); the class information survives the augmentation."""
    torch.manual_seed(0)
    train_x = splits.train.x.repeat(3, 1)
    train_views, _ = augment()(train_x, Batch())
    test_views, _ = augment()(splits.test.x, Batch())
    nearest = torch.cdist(test_views, train_views).topk(5, largest=False).indices
    pred = splits.train.y.repeat(3)[nearest].mode(1).values
    assert (pred == splits.test.y).float().mean() > 0.65


def test_random_shift_moves_images_by_at_most_max_shift():
    img = torch.zeros(200, 8, 8)
    img[:, 4, 3] = 1.0
    torch.manual_seed(0)
    out, _ = data.RandomShift((8, 8), max_shift=1)(img.reshape(200, 64), Batch())
    out = out.reshape(200, 8, 8)
    assert torch.equal(out.sum((1, 2)), torch.ones(200))  # an interior pixel is never lost
    pos = out.flatten(1).argmax(1)
    dy, dx = pos // 8 - 4, pos % 8 - 3
    assert dy.abs().max() == 1 and dx.abs().max() == 1
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 9  # every offset in [-1, 1]^2 occurs
    edge = torch.zeros(1, 64)
    edge[0, 0] = 1.0
    torch.manual_seed(1)
    moved = torch.stack([data.RandomShift((8, 8), 1)(edge, Batch())[0] for _ in range(50)])
    assert moved.sum((1, 2)).min() == 0  # shifted off the image: vacated pixels are zero
    with pytest.raises(ShapeError, match="8x8"):
        data.RandomShift((8, 8), 1)(torch.zeros(2, 10), Batch())


def test_mask_noise_and_scale_statistics():
    torch.manual_seed(0)
    x = torch.ones(1000, 64)
    masked, _ = data.RandomMask(0.3)(x, Batch())
    assert set(masked.unique().tolist()) == {0.0, 1.0}
    assert (masked == 0).float().mean() == pytest.approx(0.3, abs=0.01)
    noisy, _ = data.GaussianNoise(0.5)(x, Batch())
    assert (noisy - x).std() == pytest.approx(0.5, rel=0.02)
    scaled, _ = data.RandomScale(0.2)(x, Batch())
    factors = scaled[:, 0]
    assert torch.equal(scaled, factors[:, None].expand_as(scaled))  # one factor per sample
    assert 0.8 <= float(factors.min()) and float(factors.max()) <= 1.2
    assert factors.std() == pytest.approx(0.4 / 12 ** 0.5, rel=0.1)  # uniform on [0.8, 1.2]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: data.RandomShift((8, 8), -1), "max_shift must be >= 0"),
    (lambda: data.GaussianNoise(-0.1), "std must be >= 0"),
    (lambda: data.RandomMask(1.0), r"p must be in \[0, 1\)"),
    (lambda: data.RandomScale(1.5), r"amount must be in \[0, 1\)"),
])
def test_bad_augmentation_parameters(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def _ramp(b, h=8, w=8):
    """Images whose value is the column's centre in [-1, 1] coordinates (a linear ramp)."""
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    return cols.expand(b, h, w).clone()


def test_random_resized_crop_of_the_whole_image_is_the_identity():
    x = torch.rand(5, 64)
    out, _ = data.RandomResizedCrop((8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, Batch())
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)


def test_random_resized_crop_takes_boxes_of_the_drawn_area_at_random_positions():
    torch.manual_seed(0)
    x = _ramp(200)
    out, _ = data.RandomResizedCrop((8, 8), scale=(0.25, 0.25), ratio=(1.0, 1.0))(x, Batch())
    # a box of half the width maps the ramp onto half its range wherever it lies (away from the
    # outermost half pixel, where bilinear sampling holds the border value)
    centres = out.mean(dim=(1, 2))
    inner = centres.abs() < 0.5 - 1 / 16
    span = out[inner, 0, -1] - out[inner, 0, 0]
    torch.testing.assert_close(span, torch.full_like(span, 0.5 * float(x[0, 0, -1] - x[0, 0, 0])))
    assert inner.sum() > 100
    assert centres.abs().max() <= 0.5 + 1e-9 and centres.std() > 0.2  # inside, and spread out
    assert centres.min() < -0.4 and centres.max() > 0.4


def test_multi_crop_gives_global_then_local_views():
    views = data.multi_crop((8, 8), n_global=2, n_local=3, local_size=(4, 4), then=data.GaussianNoise(0.0))
    assert len(views) == 5
    crops = [v.transforms[0] for v in views]
    assert all(isinstance(c, data.RandomResizedCrop) for c in crops)
    assert [c.scale for c in crops] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 3
    x = torch.rand(6, 64)
    assert [v(x, Batch())[0].shape[1] for v in views] == [64, 64, 16, 16, 16]
    with pytest.raises(ShapeError, match="RandomResizedCrop.*\\[B, C\\*64\\]"):
        crops[0](torch.rand(6, 10), Batch())
    with pytest.raises(ConfigError, match="scale"):
        data.RandomResizedCrop((8, 8), scale=(0.5, 0.2))


def test_random_resized_crop_aspect_ratio_is_width_over_height():
    torch.manual_seed(1)
    x = _ramp(100)
    crop = data.RandomResizedCrop((8, 8), scale=(0.25, 0.25), ratio=(4.0, 4.0))
    wide, _ = crop(x, Batch())  # box: the full width, a quarter of the height
    torch.testing.assert_close(wide, x, rtol=0, atol=1e-9)
    tall, _ = crop(x.transpose(1, 2).contiguous(), Batch())
    centres = tall.mean(dim=(1, 2))
    inner = centres.abs() < 0.875 - 0.25 * 0.875
    span = tall[inner, -1, 0] - tall[inner, 0, 0]
    torch.testing.assert_close(span, torch.full_like(span, 0.25 * 1.75))


def test_a_noisy_part_and_a_clean_part_with_disjoint_ranges_share_no_sample(splits):
    noisy = data.reshape_training(splits, label_noise=0.3, label_fraction=0.7)
    clean = data.reshape_training(splits, label_start=0.7, label_fraction=0.1)
    assert not set(noisy.train.index.tolist()) & set(clean.train.index.tolist())
    # the parts are stratified by the true labels: the same samples with and without noise
    assert torch.equal(noisy.train.index,
                       data.reshape_training(splits, label_fraction=0.7).train.index)
    truth = dict(zip(splits.train.index.tolist(), splits.train.y.tolist()))
    wrong = sum(truth[i] != y for i, y in zip(noisy.train.index.tolist(), noisy.train.y.tolist()))
    assert 0.25 < wrong / len(noisy.train) < 0.35
    assert all(truth[i] == y for i, y in zip(clean.train.index.tolist(), clean.train.y.tolist()))
