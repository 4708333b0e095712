"""comp_sum_losses: tau = 0, 1, 2 are sum-exp, cross-entropy and MAE analytically; a written-out
Phi^tau (value and gradient) between them; finite beyond the exponential's range."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def run(tau, z, y):
    return sdk.create("objective", "comp_sum_losses", tau=tau)(sdk.Views(logits=z), sdk.Batch(targets=y)).per_sample


def slow(z, y, tau):
    rows = []
    for i in range(z.shape[0]):
        u = sum(torch.exp(z[i, k] - z[i, y[i]]) for k in range(z.shape[1]))
        rows.append(torch.log(u) if tau == 1 else (u ** (1 - tau) - 1) / (1 - tau))
    return torch.stack(rows)


G = torch.Generator().manual_seed(0)
Z = 2 * torch.randn(6, 4, generator=G, dtype=torch.float64)
Y = torch.tensor([0, 3, 1, 1, 2, 0])


def test_special_cases():
    p_y = torch.softmax(Z, 1).gather(1, Y[:, None]).squeeze(1)
    assert torch.allclose(run(1.0, Z, Y), F.cross_entropy(Z, Y, reduction="none"), rtol=1e-12)
    assert torch.allclose(run(2.0, Z, Y), 1 - p_y, rtol=1e-12)
    sum_exp = (torch.exp(Z - Z.gather(1, Y[:, None])) * (1 - F.one_hot(Y, 4))).sum(1)
    assert torch.allclose(run(0.0, Z, Y), sum_exp, rtol=1e-12)
    assert torch.allclose(run(1.5, Z, Y), (1 - p_y ** 0.5) / 0.5, rtol=1e-12)  # GCE, q = 0.5


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0, 1.7, 3.0])
def test_matches_formula_with_gradient(tau):
    z = Z.clone().requires_grad_()
    got, want = run(tau, z, Y), slow(z, Y, tau)
    assert torch.allclose(got, want, rtol=1e-10)
    g1, g2 = (torch.autograd.grad(t.sum(), z)[0] for t in (got, want))
    assert torch.allclose(g1, g2, rtol=1e-9)


def test_soft_labels_and_extreme_gaps():
    q = torch.softmax(torch.randn(6, 4, generator=G, dtype=torch.float64), 1)
    per_class = torch.stack([run(0.5, Z, torch.full((6,), c)) for c in range(4)], 1)
    assert torch.allclose(run(0.5, Z, q), (q * per_class).sum(1), rtol=1e-12)
    z = torch.tensor([[0.0, 1e4]], requires_grad=True)
    value = run(0.0, z, torch.tensor([0]))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(z.grad).all() and z.grad[0, 0] < 0


def test_errors():
    with pytest.raises(sdk.ConfigError, match="tau must be"):
        sdk.create("objective", "comp_sum_losses", tau=-1.0)
    with pytest.raises(sdk.ShapeError, match=r"comp_sum_losses: Batch.targets must lie in \[0, 4\)"):
        run(1.0, Z, torch.tensor([0, 4, 1, 1, 2, 0]))


def test_default_tau_is_cross_entropy():
    # tau = 1 (the default; the paper recommends none): Phi^1 = log, the logistic loss
    g = torch.Generator().manual_seed(6)
    z, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    got = sdk.create("objective", "comp_sum_losses")(sdk.Views(logits=z), sdk.Batch(targets=y))
    assert torch.allclose(got.per_sample, torch.nn.functional.cross_entropy(z, y, reduction="none"),
                          rtol=1e-12)
