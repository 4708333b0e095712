"""high_frequency_perceptual: Haar detail bands against a slow block-by-block loop, the
orthonormal transform's energy identity, blindness to coarse content, float32 compute."""

import pytest
import torch

import sdk
from plugins.image.high_frequency_perceptual import high_frequency_bands, high_frequency_perceptual
from sdk import keys


def _slow_bands(img, levels):
    """Per image, channel and 2x2 block, level by level (float64): a list of [C, 3, h, w]."""
    x, out = img.double(), []
    for _ in range(levels):
        c, h, w = x.shape[0], x.shape[1] // 2, x.shape[2] // 2
        low, high = torch.zeros(c, h, w, dtype=torch.float64), torch.zeros(c, 3, h, w, dtype=torch.float64)
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    a, b = x[ch, 2 * i, 2 * j], x[ch, 2 * i, 2 * j + 1]
                    cc, d = x[ch, 2 * i + 1, 2 * j], x[ch, 2 * i + 1, 2 * j + 1]
                    low[ch, i, j] = (a + b + cc + d) / 2
                    high[ch, 0, i, j] = (a - b + cc - d) / 2  # left minus right columns
                    high[ch, 1, i, j] = (a + b - cc - d) / 2  # top minus bottom rows
                    high[ch, 2, i, j] = (a - b - cc + d) / 2  # the diagonal
        out.append(high)
        x = low
    return out, x


def _slow_loss(pred, target, levels):
    per_image = []
    for p, t in zip(pred, target):
        hp, _ = _slow_bands(p, levels)
        ht, _ = _slow_bands(t, levels)
        per_image.append(sum(((a - b) ** 2).mean() for a, b in zip(hp, ht)))
    return torch.stack(per_image)


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=torch.float64)
    return x, x + 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)


def test_bands_value_and_gradient_equal_the_slow_loop():
    x, y = _pair((2, 2, 8, 8))
    highs, low = high_frequency_bands(x, 3)
    for b in range(2):
        slow_highs, slow_low = _slow_bands(x[b], 3)
        for fast, slow in zip(highs, slow_highs):
            torch.testing.assert_close(fast[b], slow, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(low[b], slow_low, rtol=1e-12, atol=1e-12)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    fast, slow = high_frequency_perceptual(ya, x, 2), _slow_loss(yb, x, 2)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    fast.sum().backward()
    slow.sum().backward()
    torch.testing.assert_close(ya.grad, yb.grad, rtol=1e-10, atol=1e-14)


def test_orthonormal_energy_identity():
    x, _ = _pair((3, 2, 16, 16), seed=1)
    highs, low = high_frequency_bands(x, 3)
    energy = low.pow(2).sum((1, 2, 3)) + sum(h.pow(2).sum((1, 2, 3, 4)) for h in highs)
    torch.testing.assert_close(energy, x.pow(2).sum((1, 2, 3)), rtol=1e-12, atol=1e-12)


def test_blind_to_coarse_content_and_sensitive_to_one_pixel_of_detail():
    x, _ = _pair((2, 3, 16, 16), seed=2)
    g = torch.Generator().manual_seed(3)
    obj = sdk.create("objective", "high_frequency_perceptual")
    assert obj.levels == 2  # the x4 invertible network's two Haar downscaling stages
    coarse = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    offset = coarse.repeat_interleave(4, -1).repeat_interleave(4, -2)  # constant on 4x4 blocks
    loss = obj(sdk.Views(embeddings=((x + offset).flatten(1),)), sdk.Batch(extras={keys.INPUT: x}))
    assert loss.value.abs() < 1e-12 and (offset ** 2).mean() > 0.5  # a large pixel error, no loss
    # one level sees the offset inside each 4x4 block
    one = sdk.create("objective", "high_frequency_perceptual", levels=1)
    three = sdk.create("objective", "high_frequency_perceptual", levels=3)
    assert one(sdk.Views(embeddings=((x + offset).flatten(1),)), sdk.Batch(extras={keys.INPUT: x})).value < 1e-12
    assert three(sdk.Views(embeddings=((x + offset).flatten(1),)), sdk.Batch(extras={keys.INPUT: x})).value > 0.1
    detail = x.clone()
    detail[0, 0, 5, 6] += 1.0
    loss = obj(sdk.Views(embeddings=(detail.flatten(1),)), sdk.Batch(extras={keys.INPUT: x}))
    # a unit impulse puts squared detail coefficients of 3/4 in level 1 and 3/16 in level 2,
    # each averaged over that level's 3 channels x 3 bands x positions
    want = torch.tensor([0.75 / (3 * 8 * 8 * 3) + 0.1875 / (3 * 4 * 4 * 3), 0.0], dtype=torch.float64)
    torch.testing.assert_close(loss.per_sample, want, rtol=1e-12, atol=1e-15)


def test_computed_in_float32_under_bfloat16():
    x, y = _pair((2, 1, 8, 8), seed=4)
    xb, yb = x.bfloat16(), y.bfloat16()
    out = high_frequency_perceptual(yb, xb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, high_frequency_perceptual(yb.float(), xb.float()))


def test_bad_input_is_named():
    obj = sdk.create("objective", "high_frequency_perceptual")
    x, y = _pair((2, 1, 8, 8))
    with pytest.raises(sdk.ShapeError, match=r"high_frequency_perceptual.*\[B, C, H, W\]"):
        obj(sdk.Views(embeddings=(y.flatten(1),)), sdk.Batch(extras={keys.INPUT: x.flatten(1)}))
    with pytest.raises(sdk.ShapeError, match=r"Views.embeddings\[0\] \[2, 10\]"):
        obj(sdk.Views(embeddings=(y.flatten(1)[:, :10],)), sdk.Batch(extras={keys.INPUT: x}))
    with pytest.raises(sdk.ShapeError, match="6x6 do not split into 2 Haar level.*multiples of 4"):
        obj(sdk.Views(embeddings=(y[..., :6, :6].flatten(1),)), sdk.Batch(extras={keys.INPUT: x[..., :6, :6]}))
    flat = sdk.create("objective", "high_frequency_perceptual", image_shape=(1, 8, 8))
    with pytest.raises(sdk.ShapeError, match="image_shape"):
        flat(sdk.Views(embeddings=(y.flatten(1)[:, :9],)), sdk.Batch(extras={keys.INPUT: x.flatten(1)[:, :9]}))
    torch.testing.assert_close(flat(sdk.Views(embeddings=(y.flatten(1),)),
                                    sdk.Batch(extras={keys.INPUT: x.flatten(1)})).per_sample,
                               _slow_loss(y, x, 2))
    with pytest.raises(sdk.ConfigError, match="levels"):
        sdk.create("objective", "high_frequency_perceptual", levels=0)
    with pytest.raises(sdk.ConfigError, match="image_shape"):
        sdk.create("objective", "high_frequency_perceptual", image_shape=(8, 8))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(obj(sdk.Views(embeddings=(y.flatten(1),)), sdk.Batch(extras={keys.INPUT: nan})).value)
