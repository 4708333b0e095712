"""compositional_nll: the analytic NLL of a 1-D Gaussian, the moving average of the inner value
and the compositional gradient against a written-out loop, and Gaussian mean estimation."""

import math

import pytest
import torch

import sdk

LOG_Q = "noise_log_density"


def gaussian(mu, x, noise):
    """Energies f = -(x - mu)^2 / 2 on data and noise (q = N(0, 2^2)) and log q."""
    log_q = -noise ** 2 / 8 - math.log(2 * math.sqrt(2 * math.pi))
    f_x, f_n = (-(v - mu) ** 2 / 2 for v in (x, noise))
    return sdk.Views(embeddings=(f_x[:, None], f_n[:, None])), sdk.Batch(extras={LOG_Q: log_q})


def test_value_is_the_analytic_nll_with_many_noise_samples():
    g = torch.Generator().manual_seed(0)
    n = 100_000
    x = 1.5 + torch.randn(n, generator=g, dtype=torch.float64)
    noise = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    obj = sdk.create("objective", "compositional_nll").double()
    mu = 0.7
    value = obj(*gaussian(mu, x, noise)).value.item()
    exact = ((x - mu) ** 2 / 2).mean().item() + 0.5 * math.log(2 * math.pi)  # log Z = log sqrt(2 pi)
    assert value == pytest.approx(exact, rel=0.01)


def test_moving_average_and_gradient_match_a_loop():
    g = torch.Generator().manual_seed(1)
    obj = sdk.create("objective", "compositional_nll", gamma=0.3).double().train()
    u = None
    for _ in range(4):
        x = 1.0 + torch.randn(16, generator=g, dtype=torch.float64)
        noise = 2 * torch.randn(16, generator=g, dtype=torch.float64)
        mu = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        loss = obj(*gaussian(mu, x, noise))
        views, batch = gaussian(mu, x, noise)
        w = views.embeddings[1][:, 0] - batch.extras[LOG_Q]
        g_hat = torch.exp(w).mean()
        u = g_hat.detach() if u is None else 0.7 * u + 0.3 * g_hat.detach()
        assert loss.value.item() == pytest.approx((-views.embeddings[0].mean() + torch.log(u)).item(), rel=1e-12)
        assert obj.log_u.item() == pytest.approx(math.log(u.item()), rel=1e-12)
        (got,) = torch.autograd.grad(loss.value, mu)
        (want,) = torch.autograd.grad(-views.embeddings[0].mean() + g_hat / u, mu)
        assert got.item() == pytest.approx(want.item(), rel=1e-10)
    state = obj.state_dict()
    fresh = sdk.create("objective", "compositional_nll", gamma=0.3).double()
    fresh.load_state_dict(state)
    assert fresh.log_u.item() == obj.log_u.item() and fresh.steps.item() == 4
    obj.eval()
    before = obj.log_u.clone()
    obj(*gaussian(torch.tensor(0.0, dtype=torch.float64), x, noise))
    assert torch.equal(obj.log_u, before)  # evaluation leaves the average alone


def test_sgd_recovers_the_gaussian_mean():
    g = torch.Generator().manual_seed(2)
    x_all = 1.3 + torch.randn(2000, generator=g, dtype=torch.float64)
    obj = sdk.create("objective", "compositional_nll").double().train()
    mu = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([mu], lr=0.3)
    for _ in range(300):
        idx = torch.randint(0, 2000, (64,), generator=g)
        noise = 2 * torch.randn(64, generator=g, dtype=torch.float64)
        loss = obj(*gaussian(mu, x_all[idx], noise)).value
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(mu.item() - x_all.mean().item()) < 0.1


def test_errors():
    obj = sdk.create("objective", "compositional_nll")
    views, batch = gaussian(0.0, torch.zeros(4), torch.zeros(4))
    with pytest.raises(sdk.ShapeError, match=r"compositional_nll: Batch.extras\['noise_log_density'\] must be"):
        obj(views, sdk.Batch(extras={LOG_Q: torch.zeros(3)}))
    with pytest.raises(sdk.RequirementError, match="needs at least 2 views"):
        obj(sdk.Views(embeddings=views.embeddings[:1]), batch)
    assert obj.gamma == 0.1
    with pytest.raises(sdk.ConfigError, match="gamma"):
        sdk.create("objective", "compositional_nll", gamma=0.0)
