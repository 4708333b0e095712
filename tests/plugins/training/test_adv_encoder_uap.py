"""adv_encoder_uap: the high-pass equals numpy's FFT with the radial mask built by a loop, the loss
equals AdvEncoder's written out (negated InfoNCE or cosine, reconstruction and high-frequency
terms), the learned perturbation stays in the eps-ball and leaves the encoder untouched, the
paper's defaults are the constructor's, and on digits the perturbation learned on one half costs a
linear probe far more accuracy on the other half than random noise of the same L-inf norm."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.training.adv_encoder_uap import advencoder_loss, high_frequency
from sdk.types import Batch


def slow_high(x, r):
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    mask = np.array([[0.0 if math.sqrt((i - h / 2) ** 2 + (j - w / 2) ** 2) < r else 1.0 for j in range(w)]
                     for i in range(h)])
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            spec = np.fft.fftshift(np.fft.fft2(x[b, c])) * mask
            out[b, c] = np.real(np.fft.ifft2(np.fft.ifftshift(spec)))
    return out


@pytest.mark.parametrize("r", [0.0, 2.0, 3.5])
def test_high_pass_equals_the_numpy_loop(r):
    x = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.allclose(high_frequency(x, r).numpy(), slow_high(x.numpy(), r), atol=1e-10)
    if r == 0:
        assert torch.allclose(high_frequency(x, r), x)


def test_loss_equals_the_written_out_terms():
    g = torch.Generator().manual_seed(1)
    clean, per = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    x = torch.rand(5, 1, 6, 6, generator=g)
    x_adv = x + 0.05 * torch.randn(5, 1, 6, 6, generator=g)
    rec = ((x_adv - x) ** 2).mean()
    hf = ((high_frequency(x_adv, 2.0) - high_frequency(x, 2.0)) ** 2).mean()
    nce = 0.0
    for i in range(5):
        sims = [float(F.cosine_similarity(clean[i], per[j], dim=0)) / 0.1 for j in range(5)]
        nce += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    want = 5.0 * (-nce / 5) + rec - hf
    got = advencoder_loss(clean, per, x, x_adv, alpha=5.0, radius=2.0, temperature=0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    cos = sum(float(F.cosine_similarity(clean[i], per[i], dim=0)) for i in range(5)) / 5
    got = advencoder_loss(clean, per, x, x_adv, alpha=2.0, radius=2.0, criterion="cos")
    assert got.item() == pytest.approx(2.0 * cos + rec.item() - hf.item(), rel=1e-5)


def digits_encoder():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    head = torch.nn.Linear(32, 10)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], 1e-2)
    for _ in range(200):  # a quickly trained stand-in for a pre-trained encoder
        loss = F.cross_entropy(head(enc(x[:900])), y[:900])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return enc, x, y


def test_perturbation_stays_in_the_ball_and_leaves_the_encoder_alone():
    enc, x, _ = digits_encoder()
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    uap = sdk.create("transform", "adv_encoder_uap", eps=0.05, radius=2.0).fit(enc, x[:200], steps=20)
    assert uap.delta.shape == (1, 8, 8) and uap.delta.abs().max() <= 0.05 + 1e-7
    assert uap.delta.abs().max() > 0.04  # the attack uses its budget
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and p.requires_grad for p in enc.parameters()) and enc.training
    out, _ = uap(x[:10], Batch())
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out, (x[:10] + uap.delta).clamp(0, 1))


def test_paper_defaults():
    uap = sdk.create("transform", "adv_encoder_uap")
    assert (uap.eps, uap.alpha, uap.radius, uap.temperature, uap.criterion) == (10 / 255, 5.0, 8.0, 0.1, "nce")


def test_universal_perturbation_transfers_and_beats_random_noise_on_digits():
    """Learned on the first 900 digits, applied to the other 897: measured probe accuracy 0.94
    clean, 0.83 under the perturbation (eps = 0.1), 0.93 under a random sign pattern of the
    same L-inf norm."""
    from sklearn.linear_model import LogisticRegression

    enc, x, y = digits_encoder()
    uap = sdk.create("transform", "adv_encoder_uap", eps=0.1, radius=2.0).fit(enc, x[:900], steps=150)
    with torch.no_grad():
        probe = LogisticRegression(max_iter=2000).fit(enc(x[:900]).numpy(), y[:900].numpy())
        clean = probe.score(enc(x[900:]).numpy(), y[900:].numpy())
        attacked = probe.score(enc(uap(x[900:], Batch())[0]).numpy(), y[900:].numpy())
        sign = 2 * torch.randint(0, 2, (1, 1, 8, 8), generator=torch.Generator().manual_seed(1)) - 1
        noisy = probe.score(enc((x[900:] + 0.1 * sign).clamp(0, 1)).numpy(), y[900:].numpy())
    assert clean - attacked > 0.05
    assert clean - attacked > 3 * max(clean - noisy, 0.005)


def test_bad_inputs_are_named():
    uap = sdk.create("transform", "adv_encoder_uap")
    with pytest.raises(sdk.NotFittedError, match="'adv_encoder_uap' has no perturbation"):
        uap(torch.rand(2, 1, 8, 8), Batch())
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    with pytest.raises(sdk.ShapeError, match=r"'adv_encoder_uap': the surrogate images must be floating images \[B, C, H, W\]"):
        uap.fit(enc, torch.rand(4, 64))
    uap.fit(enc, torch.rand(4, 1, 8, 8), steps=1)
    with pytest.raises(sdk.ShapeError, match=r"the inputs \[2, 1, 6, 6\] do not match the perturbation \[1, 8, 8\]"):
        uap(torch.rand(2, 1, 6, 6), Batch())
    with pytest.raises(sdk.ConfigError, match="criterion"):
        sdk.create("transform", "adv_encoder_uap", criterion="l2")
