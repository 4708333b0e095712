"""merlin_cross_component_nll: the loss against the Gaussian log-density written out per pixel
(value and gradient), its minimiser R_hat = 2 E[b^2] = R, the split's bookkeeping and
normalisation, and despeckling of digits-as-reflectivity by a small CNN trained through the
Trainer on the unseen component only."""

import functools
import math

import pytest
import torch

import sdk
from plugins.masked.merlin_cross_component_nll import (
    LOG_M,
    LOG_MAX,
    log_reflectivity,
    merlin_estimate,
    merlin_nll,
    normalize_component,
)
from sdk import keys

NAME = "merlin_cross_component_nll"


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_loss_is_the_gaussian_nll_of_the_other_component_pixel_by_pixel():
    """-log N(b; 0, R_hat / 2) = 1/2 log R_hat + b^2 / R_hat + 1/2 log pi, per pixel."""
    u = torch.rand(3, 5, generator=_g(), dtype=torch.float64).requires_grad_()
    b = torch.randn(3, 1, 5, generator=_g(1), dtype=torch.float64)
    got = merlin_nll(u, b, -2.0, 1.5)
    rows = []
    for i in range(3):
        total = 0.0
        for p in range(5):
            log_r = 2 * (u[i, p] * (1.5 - -2.0) + -2.0)
            r_hat = torch.exp(log_r) + 1e-6
            density = torch.distributions.Normal(0.0, (r_hat / 2).sqrt()).log_prob(b[i, 0, p])
            total = total + (-density - 0.5 * math.log(math.pi)) + 0.5 * (log_r - r_hat.log())
        rows.append(total / 5)
    slow = torch.stack(rows)
    torch.testing.assert_close(got, slow)
    g, = torch.autograd.grad(got.sum(), u)
    g_slow, = torch.autograd.grad(slow.sum(), u)
    torch.testing.assert_close(g, g_slow)


def test_defaults_are_the_authors_normalisation():
    obj, tf = sdk.create("objective", NAME), sdk.create("transform", NAME)
    assert (obj.log_min, obj.log_max) == (tf.log_min, tf.log_max) == (LOG_M, LOG_MAX)
    assert abs(LOG_M + 1.4293) < 1e-4 and abs(LOG_MAX - 10.0890) < 1e-4
    assert tf.swap is True and obj.batch_coupled is False
    a = torch.tensor([0.5])
    torch.testing.assert_close(normalize_component(a),
                               (torch.log(a ** 2 + 1e-3) - 2 * LOG_M) / (2 * (LOG_MAX - LOG_M)))
    # the output's scale is the input's: a network passing its input on returns log(a^2 + 1e-3)
    torch.testing.assert_close(log_reflectivity(normalize_component(a)), torch.log(a ** 2 + 1e-3))


def test_minimiser_of_the_expected_loss_is_the_reflectivity():
    """With b ~ N(0, R / 2), E[L] is minimised at exp(s) = 2 E[b^2] = R (checked numerically)."""
    r = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    b = torch.randn(8000, 3, generator=_g(2), dtype=torch.float64) * (r / 2).sqrt()
    u = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)  # one output per reflectivity
    opt = torch.optim.LBFGS([u], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = merlin_nll(u.expand(3, len(b)), b.T).sum()
        loss.backward()
        return loss

    opt.step(closure)
    fitted = log_reflectivity(u.detach()).exp().squeeze(1)
    torch.testing.assert_close(fitted, 2 * b.pow(2).mean(0), rtol=1e-4, atol=1e-7)
    assert ((fitted / r - 1).abs() < 0.05).all(), fitted  # 3 standard errors
    # and the estimate averages the two components' reflectivities
    ua, ub = torch.tensor([0.2]), torch.tensor([0.4])
    torch.testing.assert_close(merlin_estimate(ua, ub), (log_reflectivity(ua).exp()
                                                         + log_reflectivity(ub).exp()) / 2)


def test_split_feeds_one_component_and_targets_the_other():
    z = torch.randn(400, 2, 3, 3, generator=_g(3))
    tf = sdk.create("transform", NAME, log_min=-3.0, log_max=1.0)
    torch.manual_seed(0)
    seen, batch = tf(z, sdk.Batch(index=torch.arange(400)))
    other = batch.extras[keys.OTHER_COMPONENT]
    assert seen.shape == other.shape == (400, 1, 3, 3)
    real_seen = torch.isclose(seen, normalize_component(z[:, :1], -3.0, 1.0)).all(dim=(1, 2, 3))
    imag_seen = torch.isclose(seen, normalize_component(z[:, 1:], -3.0, 1.0)).all(dim=(1, 2, 3))
    assert (real_seen ^ imag_seen).all()  # each sample sees exactly one component ...
    torch.testing.assert_close(other[real_seen], z[real_seen, 1:])  # ... and is scored on the other
    torch.testing.assert_close(other[imag_seen], z[imag_seen, :1])
    assert 150 < int(real_seen.sum()) < 250  # p = 1/2
    fixed = sdk.create("transform", NAME, swap=False)
    seen, batch = fixed(z, sdk.Batch())
    torch.testing.assert_close(seen, normalize_component(z[:, :1]))
    assert torch.equal(batch.extras[keys.OTHER_COMPONENT], z[:, 1:])


def test_a_cnn_trained_on_the_other_component_despeckles_digits():
    """Reflectivity R = 0.05 + pixel intensity of 8x8 digits, one single-look complex draw
    z = a + ib, a, b ~ N(0, R / 2); log R_hat of the trained CNN (both components averaged) is
    >= 3 dB closer to log R than the single-look log-intensity log |z|^2."""
    x = sdk.data.load("digits").train.tensors[0][:512].float().view(-1, 1, 8, 8)
    r = 0.05 + x
    z = torch.randn(len(x), 2, 8, 8, generator=_g(4)) * (r / 2).sqrt()
    lo, hi = -3.0, 1.0
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 1, 3, padding=1), torch.nn.Flatten())
    tf = sdk.create("transform", NAME, log_min=lo, log_max=hi)
    obj = sdk.create("objective", NAME, log_min=lo, log_max=hi)
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(z, torch.zeros(len(z)).long()),
                                         batch_size=64, shuffle=True)
    sdk.Trainer(net, obj, functools.partial(torch.optim.Adam, lr=1e-2), transforms=tf,
                max_steps=150, progress=False, device="cpu").fit(loader)
    with torch.no_grad():
        est = merlin_estimate(net(normalize_component(z[:, :1], lo, hi)),
                              net(normalize_component(z[:, 1:], lo, hi)), lo, hi)
    mse_net = (est.log() - r.flatten(1).log()).pow(2).mean()
    mse_noisy = (z.pow(2).sum(1).log() - r.squeeze(1).log()).pow(2).mean()
    gain = 10 * torch.log10(mse_noisy / mse_net)
    assert gain > 3, gain


def test_errors_name_the_plugin_and_the_field():
    obj = sdk.create("objective", NAME)
    u = torch.rand(4, 9)
    with pytest.raises(sdk.RequirementError, match=f"'{NAME}' needs extras\\['other_component'\\]"):
        obj(sdk.Views(embeddings=(u,)), sdk.Batch(index=torch.arange(4)))
    with pytest.raises(sdk.ShapeError, match=f"'{NAME}'.*other_component.*4 rows of 9 pixels"):
        obj(sdk.Views(embeddings=(u,)), sdk.Batch(extras={keys.OTHER_COMPONENT: torch.rand(4, 1, 2, 2)}))
    with pytest.raises(sdk.ShapeError, match=f"'{NAME}'.*other_component"):
        obj(sdk.Views(embeddings=(u,)), sdk.Batch(extras={keys.OTHER_COMPONENT: torch.ones(4, 9).long()}))
    with pytest.raises(sdk.ShapeError, match=f"transform '{NAME}'.*\\[B, 2, ...\\]"):
        sdk.create("transform", NAME)(torch.rand(4, 3, 2, 2), sdk.Batch())
    for kind in ("objective", "transform"):
        with pytest.raises(sdk.ConfigError, match=f"{NAME}: log_max must exceed log_min"):
            sdk.create(kind, NAME, log_min=1.0, log_max=1.0)
