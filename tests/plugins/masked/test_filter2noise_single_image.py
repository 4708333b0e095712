"""filter2noise_single_image: the sub-image downsampler, ELS and the bilateral filter against
per-pixel loops, the loss's terms against their definitions, the defaults of the authors' code,
and denoising of noisy upscaled digits by training on the noisy images alone."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.masked.filter2noise_single_image import (
    bilateral_filter,
    dog_kernel,
    downsample_pair,
    euclidean_local_shuffle,
    f2n_loss,
)

NAME = "filter2noise_single_image"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_downsampler_averages_the_two_diagonals_of_each_block():
    y = torch.rand(2, 3, 4, 6, generator=_g(), dtype=torch.float64)
    d1, d2 = downsample_pair(y)
    for b in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(3):
                    blk = y[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                    assert torch.isclose(d1[b, c, i, j], (blk[0, 1] + blk[1, 0]) / 2)
                    assert torch.isclose(d2[b, c, i, j], (blk[0, 0] + blk[1, 1]) / 2)
    const = torch.full((1, 1, 4, 4), 0.3)
    assert torch.equal(downsample_pair(const)[0], downsample_pair(const)[1])


def _slow_els(y):
    out = y.clone()
    b, c, h, w = y.shape
    for n in range(b):
        for i in range(0, h, 2):
            for j in range(0, w, 2):
                pos = [(i, j), (i, j + 1), (i + 1, j), (i + 1, j + 1)]
                best, pair = None, None
                for p in range(4):
                    for q in range(4):
                        if p != q:
                            d = float((y[n, :, pos[p][0], pos[p][1]] - y[n, :, pos[q][0], pos[q][1]]).pow(2).sum())
                            if best is None or d < best:
                                best, pair = d, (p, q)
                (pi, pj), (qi, qj) = pos[pair[0]], pos[pair[1]]
                out[n, :, pi, pj], out[n, :, qi, qj] = y[n, :, qi, qj], y[n, :, pi, pj]
    return out


def test_els_swaps_the_closest_pair_of_each_block():
    y = torch.rand(2, 2, 4, 6, generator=_g(1), dtype=torch.float64)  # continuous values: no ties
    got = euclidean_local_shuffle(y)
    torch.testing.assert_close(got, _slow_els(y), rtol=0, atol=0)
    assert not torch.equal(got, y)
    torch.testing.assert_close(euclidean_local_shuffle(got), y, rtol=0, atol=0)  # an involution
    blocks = lambda t: t.reshape(2, 2, 2, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 2, 3, 2, 4)  # noqa: E731
    assert torch.equal(blocks(got).sort(-1).values, blocks(y).sort(-1).values)  # same multiset per block
    # exactly two pixels of each block move
    moved = (got != y).any(1).reshape(2, 2, 2, 3, 2).sum((2, 4))
    assert (moved == 2).all()


def test_defaults_are_the_authors():
    obj = sdk.create("objective", NAME)
    assert obj.lam == 350.0 and obj.image_shape == (1, 16, 16) and obj.batch_coupled is False
    assert len(obj.denoiser.predictors) == 2 and obj.denoiser.predictors[0].patch == 8
    assert obj.denoiser.radius == 6
    r = torch.arange(7.0, dtype=torch.float64) - 3
    d2 = r.view(-1, 1) ** 2 + r.view(1, -1) ** 2
    g9, g10 = torch.exp(-d2 / 162), torch.exp(-d2 / 200)
    torch.testing.assert_close(obj.dog.double(), g9 / g9.sum() - g10 / g10.sum(), rtol=1e-5, atol=1e-9)
    assert abs(float(dog_kernel().sum())) < 1e-12


def test_sigmas_are_a_softplus_clamped_at_six():
    obj = sdk.create("objective", NAME)
    pred = obj.denoiser.predictors[0]
    y = torch.rand(2, 1, 16, 16, generator=_g(6))
    with torch.no_grad():
        pred.proj.bias.copy_(torch.tensor([100.0, 2.0, -100.0]))
        pred.proj.weight.zero_()
        s = pred(y)
    assert s.shape == (2, 16, 16, 3)
    torch.testing.assert_close(s[..., 0], torch.full((2, 16, 16), 6 + 1e-6))
    torch.testing.assert_close(s[..., 1], torch.full((2, 16, 16), float(F.softplus(torch.tensor(2.0))) + 1e-6))
    assert float(s[..., 2].max()) < 2e-6


def test_bilateral_filter_equals_a_per_pixel_loop():
    x = torch.rand(1, 2, 5, 6, generator=_g(2), dtype=torch.float64)
    sig = 0.3 + torch.rand(1, 5, 6, 3, generator=_g(3), dtype=torch.float64)
    got = bilateral_filter(x, sig, 2)
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(5):
        for j in range(6):
            sx, sy, sr = sig[0, i, j].tolist()
            num, den = torch.zeros(2, dtype=torch.float64), 0.0
            for di in range(-2, 3):
                for dj in range(-2, 3):
                    q = xp[0, :, i + 2 + di, j + 2 + dj]
                    wgt = math.exp(-dj ** 2 / (2 * sx ** 2) - di ** 2 / (2 * sy ** 2)) * math.exp(
                        -float((q - x[0, :, i, j]).pow(2).sum()) / (2 * sr ** 2))
                    num, den = num + wgt * q, den + wgt
            torch.testing.assert_close(got[0, :, i, j], num / (den + 1e-8))


def test_loss_terms_are_the_papers():
    y = torch.rand(2, 1, 16, 16, generator=_g(4), dtype=torch.float64)
    blur = torch.full((1, 1, 3, 3), 1 / 9, dtype=torch.float64)

    def f(t):
        return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), blur)

    per_sample, terms = f2n_loss(f, y, dog_kernel().double(), 350.0)
    y1, y2 = y[..., 0::2, 1::2] / 2 + y[..., 1::2, 0::2] / 2, y[..., 0::2, 0::2] / 2 + y[..., 1::2, 1::2] / 2
    u1, u2 = f(_slow_els(y1)), f(_slow_els(y2))
    full = f(y)
    a, b = full[..., 0::2, 1::2] / 2 + full[..., 1::2, 0::2] / 2, full[..., 0::2, 0::2] / 2 + full[..., 1::2, 1::2] / 2
    dog = dog_kernel().double().view(1, 1, 7, 7)
    for n in range(2):
        expect = (F.l1_loss(u1[n], u2[n]) / 3 + (F.l1_loss(u1[n], a[n]) + F.l1_loss(u2[n], b[n])) / 3
                  + F.l1_loss(a[n], b[n]) / 3
                  + 350 * F.l1_loss(F.conv2d(y[n:n + 1], dog, padding=3).abs(),
                                    F.conv2d(full[n:n + 1], dog, padding=3).abs()))
        torch.testing.assert_close(per_sample[n], expect)
    # the identity keeps every edge (no edge term) but cannot undo the shuffle
    _, ident = f2n_loss(lambda t: t, y, dog_kernel().double())
    assert float(ident["edge"].abs().max()) == 0 and (ident["resolution"] > 0).all()


def test_training_on_the_noisy_images_alone_denoises_digits():
    """8x8 digits upscaled to 16x16, Gaussian noise sigma 0.15: 30 AdamW steps of the F2N loss
    on the noisy images raise the PSNR >= 2 dB over the noisy input and >= 1.5 dB over the
    untrained filter."""
    x = sdk.data.load("digits").train.tensors[0][:4].float().view(-1, 1, 8, 8)
    clean = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    noisy = clean + 0.15 * torch.randn(clean.shape, generator=_g(5))

    def psnr(a):
        return float(10 * torch.log10(1 / (a - clean).pow(2).flatten(1).mean(1)).mean())

    torch.manual_seed(0)
    obj = sdk.create("objective", NAME, patch_size=4)
    with torch.no_grad():
        untrained = psnr(obj.denoise(noisy))
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-2, weight_decay=0.01)
    for _ in range(30):
        loss = obj(sdk.Views(embeddings=(noisy.flatten(1),)), sdk.Batch()).value
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = psnr(obj.denoise(noisy))
    assert trained > psnr(noisy) + 2 and trained > untrained + 1.5, (psnr(noisy), untrained, trained)


def test_errors_name_the_plugin_and_the_field():
    obj = sdk.create("objective", NAME)
    with pytest.raises(sdk.ShapeError, match=f"'{NAME}'.*embeddings\\[0\\].*\\[B, 256\\]"):
        obj(sdk.Views(embeddings=(torch.rand(2, 64),)), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match=f"{NAME}: image_shape"):
        sdk.create("objective", NAME, image_shape=(1, 8, 8))
    with pytest.raises(sdk.ConfigError, match=f"{NAME}: dog_size must be odd"):
        sdk.create("objective", NAME, dog_size=6)
    with pytest.raises(sdk.ConfigError, match=f"{NAME}: lam must be >= 0"):
        sdk.create("objective", NAME, lam=-1.0)
