"""batch_style_standardization: shared amplitude, kept phase, identity at mix 0, a numpy FFT loop."""

import numpy as np
import pytest
import torch

import sdk
from plugins.contrastive.batch_style_standardization import batch_style_standardization


def slow_bss(x, area_ratio, mix, reference):
    """Sample by sample with numpy's FFT; x: [B, C, H, W] float64 array."""
    amps = [np.abs(np.fft.fft2(xi)) for xi in x]
    ref = np.mean(amps, axis=0) if reference is None else amps[reference]
    h, w = x.shape[-2:]
    half = np.sqrt(area_ratio) / 2
    window = (np.abs(np.fft.fftfreq(h))[:, None] <= half) & (np.abs(np.fft.fftfreq(w))[None, :] <= half)
    out = []
    for xi, ai in zip(x, amps):
        spec = np.fft.fft2(xi)
        new_amp = np.where(window, (1 - mix) * ai + mix * ref, ai)
        out.append(np.fft.ifft2(new_amp * np.exp(1j * np.angle(spec))))
    out = np.stack(out)
    assert np.abs(out.imag).max() < 1e-9  # the window is symmetric: the result is real
    return out.real


def _x(shape=(6, 3, 8, 7), seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("area_ratio", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("mix", [1.0, 0.4])
@pytest.mark.parametrize("reference", [None, 2])
def test_matches_numpy_loop(area_ratio, mix, reference):
    x = _x()
    got = batch_style_standardization(x, area_ratio=area_ratio, mix=mix, reference=reference)
    assert got.dtype == torch.float64
    expected = slow_bss(x.numpy(), area_ratio, mix, reference)
    assert np.allclose(got.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("reference", [None, 4])
def test_full_standardisation_shares_amplitude_and_keeps_phase(reference):
    x = _x((5, 8, 8), seed=1)
    out = batch_style_standardization(x, reference=reference)
    spec_in, spec_out = torch.fft.fft2(x), torch.fft.fft2(out)
    amp = spec_out.abs()
    assert torch.allclose(amp, amp[:1].expand_as(amp), atol=1e-9)
    ref = spec_in.abs().mean(0) if reference is None else spec_in[reference].abs()
    assert torch.allclose(amp[0], ref, atol=1e-9)
    # phase preserved: the output spectrum is the input's times a positive real factor
    ratio = spec_out / spec_in
    assert torch.allclose(ratio.imag, torch.zeros_like(ratio.imag), atol=1e-9)
    assert (ratio.real > 0).all()
    if reference is not None:
        assert torch.allclose(out[reference], x[reference], atol=1e-12)


def test_mix_zero_is_identity_and_window_limits_change():
    x = _x(seed=2)
    assert torch.allclose(batch_style_standardization(x, mix=0.0), x, atol=1e-12)
    out = batch_style_standardization(x, area_ratio=0.1, reference=0)
    h, w = x.shape[-2:]
    fy, fx = torch.fft.fftfreq(h).abs(), torch.fft.fftfreq(w).abs()
    outside = ~((fy[:, None] <= 0.1 ** 0.5 / 2) & (fx[None, :] <= 0.1 ** 0.5 / 2))
    assert outside.any()
    assert torch.allclose(torch.fft.fft2(out)[..., outside], torch.fft.fft2(x)[..., outside], atol=1e-9)
    assert not torch.allclose(out, x)


def test_plugin_flat_digits_shape_and_extras():
    tf = sdk.create("transform", "batch_style_standardization", image_shape=(8, 8))
    x = torch.rand(10, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    out, batch = tf(x, sdk.Batch())
    assert out.shape == x.shape and out.dtype == x.dtype
    k = int(batch.extras["bss_reference"])
    assert float(batch.extras["bss_area_ratio"]) == 1.0
    expected = slow_bss(x.double().reshape(10, 8, 8).numpy(), 1.0, 1.0, k).reshape(10, 64)
    assert np.allclose(out.numpy(), expected, atol=1e-5)
    amp = torch.fft.fft2(out.reshape(10, 8, 8)).abs()
    assert torch.allclose(amp, amp[k].expand_as(amp), atol=1e-4)
    tf.eval()
    assert tf(x, sdk.Batch())[0] is x


def test_area_ratio_is_drawn_in_range():
    tf = sdk.create("transform", "batch_style_standardization", r_min=0.2, r_max=0.5, style="mean")
    x = _x((4, 1, 8, 8)).float()
    ratios = [float(tf(x, sdk.Batch())[1].extras["bss_area_ratio"]) for _ in range(20)]
    assert all(0.2 <= r <= 0.5 for r in ratios) and max(ratios) - min(ratios) > 0.05


@pytest.mark.parametrize("kwargs,param", [
    ({"r_min": 0.0}, "r_min"), ({"r_min": 0.5, "r_max": 0.4}, "r_max"), ({"r_max": 1.5}, "r_max"),
    ({"mix": 1.5}, "mix"), ({"style": "first"}, "style"), ({"image_shape": (64,)}, "image_shape"),
])
def test_bad_parameters_name_the_field(kwargs, param):
    with pytest.raises(sdk.ConfigError, match=param) as exc:
        sdk.create("transform", "batch_style_standardization", **kwargs)
    assert exc.value.param == param


def test_bad_inputs_raise():
    with pytest.raises(sdk.ShapeError, match="image_shape"):
        sdk.create("transform", "batch_style_standardization")(torch.rand(4, 64), sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="64"):
        sdk.create("transform", "batch_style_standardization", image_shape=(8, 8))(
            torch.rand(4, 63), sdk.Batch())
