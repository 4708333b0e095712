"""ms_ssim_loss: MS-SSIM (Wang et al. 2003) against a slow window-by-window loop and torchmetrics."""

import math

import pytest
import torch

import sdk
from plugins.image.ms_ssim_loss import WEIGHTS, fitting_scales, ms_ssim
from sdk import keys


def _slow_ms_ssim(x, y, win=11, sigma=1.5, k1=0.01, k2=0.03, weights=WEIGHTS, scales=None,
                  data_range=1.0):
    """Per image and channel, window position by window position (float64)."""
    x, y = x.double(), y.double()
    c = (win - 1) / 2
    g2 = torch.tensor([[math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma ** 2))
                        for j in range(win)] for i in range(win)], dtype=torch.float64)
    g2 = g2 / g2.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = scales or max(s for s in range(1, len(weights) + 1)
                      if min(x.shape[-2:]) // 2 ** (s - 1) >= win)
    w = list(weights[:m])
    if m < len(weights):
        w = [v / sum(w) for v in w]
    out = []
    for b in range(x.shape[0]):
        per_channel = []
        for ch in range(x.shape[1]):
            a, t, value = x[b, ch], y[b, ch], 1.0
            for s in range(m):
                if s:
                    h, wd = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
                    a = (a[0:h:2, 0:wd:2] + a[1:h:2, 0:wd:2] + a[0:h:2, 1:wd:2] + a[1:h:2, 1:wd:2]) / 4
                    t = (t[0:h:2, 0:wd:2] + t[1:h:2, 0:wd:2] + t[0:h:2, 1:wd:2] + t[1:h:2, 1:wd:2]) / 4
                css, ssims = [], []
                for i in range(a.shape[0] - win + 1):
                    for j in range(a.shape[1] - win + 1):
                        pa, pt = a[i:i + win, j:j + win], t[i:i + win, j:j + win]
                        ma, mt = (g2 * pa).sum(), (g2 * pt).sum()
                        va, vt = (g2 * (pa - ma) ** 2).sum(), (g2 * (pt - mt) ** 2).sum()
                        cov = (g2 * (pa - ma) * (pt - mt)).sum()
                        cs = (2 * cov + c2) / (va + vt + c2)
                        css.append(cs)
                        ssims.append((2 * ma * mt + c1) / (ma ** 2 + mt ** 2 + c1) * cs)
                term = torch.stack(ssims if s == m - 1 else css).mean()
                value = value * term ** w[s]
            per_channel.append(value)
        out.append(torch.stack(per_channel).mean())
    return torch.stack(out)


def _pair(shape, noise, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=dtype)
    return x, (x + noise * torch.randn(*shape, generator=g, dtype=dtype)).clamp(0, 1)


def test_value_and_gradient_equal_the_slow_loop_on_two_renormalised_scales():
    x, y = _pair((2, 2, 24, 24), 0.2)
    assert fitting_scales(24, 24, 11) == 2
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, slow = ms_ssim(xa, y), _slow_ms_ssim(xb, y)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    fast.sum().backward()
    slow.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-12)


def test_five_scales_equal_torchmetrics_terms_with_wangs_weights():
    tm = pytest.importorskip("torchmetrics.functional.image")
    x, y = _pair((2, 1, 176, 176), 0.15)
    assert fitting_scales(176, 176, 11) == 5
    ours = ms_ssim(x, y)
    # torchmetrics' SSIM map averages over reflection-padded borders; its cs is cropped to the
    # valid window positions. Crop its SSIM map the same way (Wang et al.'s valid positions).
    value, a, b = torch.ones(2, dtype=torch.float64), x, y
    for s, w in enumerate(WEIGHTS):
        if s:
            a, b = torch.nn.functional.avg_pool2d(a, 2), torch.nn.functional.avg_pool2d(b, 2)
        if s < 4:
            _, term = tm.structural_similarity_index_measure(
                a, b, data_range=1.0, reduction="none", return_contrast_sensitivity=True)
        else:
            _, full = tm.structural_similarity_index_measure(
                a, b, data_range=1.0, reduction="none", return_full_image=True)
            term = full[..., 5:-5, 5:-5].mean((1, 2, 3))
        value = value * term ** w
    torch.testing.assert_close(ours, value, rtol=1e-10, atol=1e-12)
    # the five weights are Wang et al.'s, not renormalised (they sum to 1.0001)
    assert WEIGHTS == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def test_identities_self_similarity_symmetry_and_bounds():
    x, y = _pair((3, 3, 40, 40), 0.3, seed=1)
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ms_ssim(x, y), ms_ssim(y, x), rtol=1e-12, atol=1e-12)
    v = ms_ssim(x, y)
    assert ((v > 0) & (v < 1)).all()
    # more noise, lower similarity
    _, z = _pair((3, 3, 40, 40), 0.6, seed=1)
    assert (ms_ssim(x, z) < v).all()


def _views(pred, target):
    return (sdk.Views(embeddings=(pred.flatten(1),)),
            sdk.Batch(extras={keys.INPUT: target}))


def test_objective_defaults_are_wangs_and_the_loss_is_one_minus_ms_ssim():
    obj = sdk.create("objective", "ms_ssim_loss")
    assert (obj.win_size, obj.sigma, obj.k1, obj.k2, obj.data_range, obj.weights, obj.scales,
            obj.l1_weight) == (11, 1.5, 0.01, 0.03, 1.0, WEIGHTS, None, 0.0)
    x, y = _pair((2, 1, 24, 24), 0.2)
    loss = obj(*_views(y, x))
    torch.testing.assert_close(loss.per_sample, 1 - _slow_ms_ssim(y, x))
    torch.testing.assert_close(loss.value, loss.per_sample.mean())
    assert obj(*_views(x, x)).value.abs() < 1e-12


def test_l1_mix():
    x, y = _pair((2, 1, 24, 24), 0.2)
    obj = sdk.create("objective", "ms_ssim_loss", l1_weight=0.84, data_range=2.0)
    l1 = (y - x).abs().flatten(1).mean(1) / 2.0
    want = 0.16 * (1 - _slow_ms_ssim(y, x, data_range=2.0)) + 0.84 * l1
    torch.testing.assert_close(obj(*_views(y, x)).per_sample, want)


def test_digits_8x8_need_a_smaller_window_and_then_get_one_scale_ssim():
    from sklearn.datasets import load_digits

    d = torch.tensor(load_digits().data[:6], dtype=torch.float64) / 16
    noisy = (d + 0.2 * torch.randn(d.shape, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64)).clamp(0, 1)
    with pytest.raises(sdk.ShapeError, match=r"ms_ssim_loss.*8x8 hold 0 scale.*11-pixel window"):
        sdk.create("objective", "ms_ssim_loss", image_shape=(1, 8, 8))(
            sdk.Views(embeddings=(noisy,)), sdk.Batch(extras={keys.INPUT: d}))
    obj = sdk.create("objective", "ms_ssim_loss", image_shape=(1, 8, 8), win_size=7)
    loss = obj(sdk.Views(embeddings=(noisy,)), sdk.Batch(extras={keys.INPUT: d}))
    slow = _slow_ms_ssim(noisy.view(-1, 1, 8, 8), d.view(-1, 1, 8, 8), win=7)
    torch.testing.assert_close(loss.per_sample, 1 - slow)
    assert fitting_scales(8, 8, 7) == 1 and fitting_scales(8, 8, 4) == 2
    with pytest.raises(sdk.ShapeError, match="hold 1 scale"):
        sdk.create("objective", "ms_ssim_loss", image_shape=(1, 8, 8), win_size=7, scales=2)(
            sdk.Views(embeddings=(noisy,)), sdk.Batch(extras={keys.INPUT: d}))


def test_bad_input_is_named():
    obj = sdk.create("objective", "ms_ssim_loss")
    x, y = _pair((2, 1, 24, 24), 0.2)
    with pytest.raises(sdk.ShapeError, match=r"ms_ssim_loss.*\[B, C, H, W\]"):
        obj(sdk.Views(embeddings=(y.flatten(1),)), sdk.Batch(extras={keys.INPUT: x.flatten(1)}))
    with pytest.raises(sdk.ShapeError, match=r"ms_ssim_loss': Views.embeddings\[0\]"):
        obj(sdk.Views(embeddings=(y.flatten(1)[:, :10],)), sdk.Batch(extras={keys.INPUT: x}))
    with pytest.raises(sdk.ShapeError, match="image_shape"):
        sdk.create("objective", "ms_ssim_loss", image_shape=(1, 5, 5))(
            sdk.Views(embeddings=(y.flatten(1),)), sdk.Batch(extras={keys.INPUT: x.flatten(1)}))
    with pytest.raises(sdk.ConfigError, match="scales=6 exceeds the 5 weights"):
        sdk.create("objective", "ms_ssim_loss", scales=6)
    with pytest.raises(sdk.ConfigError, match="l1_weight"):
        sdk.create("objective", "ms_ssim_loss", l1_weight=1.5)
    with pytest.raises(sdk.ConfigError, match="image_shape"):
        sdk.create("objective", "ms_ssim_loss", image_shape=(8, 8))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(obj(*_views(y, nan)).value)
