"""VICReg against an explicit float64 loop (value and gradient), its defaults and collapse."""

import pytest
import torch

import sdk
from plugins.ssl.vicreg import vicreg_loss


def slow(z1, z2, lambd=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    """Scalar loops over torch scalars (so autograd gives the gradient of the loop itself)."""
    n, d = z1.shape
    inv = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_cov(z):
        means = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
        cov = [[sum((z[i, a] - means[a]) * (z[i, b] - means[b]) for i in range(n)) / (n - 1)
                for b in range(d)] for a in range(d)]
        v = sum(torch.relu(gamma - torch.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        c = sum(cov[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
        return v, c

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    return lambd * inv + mu * (v1 + v2) / 2 + nu * (c1 + c2)


def _views(n=7, d=4, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return tuple((scale * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
                 for _ in range(2))


@pytest.mark.parametrize("params", [{}, {"lambd": 1.0, "mu": 3.0, "nu": 0.5, "gamma": 1.5}])
def test_value_and_gradient_match_the_loop(params):
    z1, z2 = _views()
    ours = sdk.create("objective", "vicreg", **params)(sdk.Views(embeddings=(z1, z2))).value
    theirs = slow(z1, z2, **params)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(theirs, (z1, z2))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_paper_defaults_and_logged_terms():
    obj = sdk.create("objective", "vicreg")
    assert (obj.lambd, obj.mu, obj.nu, obj.gamma, obj.eps) == (25.0, 25.0, 1.0, 1.0, 1e-4)
    z1, z2 = _views()
    loss = obj(sdk.Views(embeddings=(z1, z2)))
    logs = loss.logs
    total = 25 * logs["invariance"] + 25 * logs["variance"] + logs["covariance"]
    assert float(total) == pytest.approx(float(loss.value), rel=1e-12)


def test_collapse_costs_the_variance_hinge_and_views_average():
    same = torch.ones(6, 3, dtype=torch.float64)  # one point: no variance, no covariance
    value = vicreg_loss(same, same)
    assert float(value) == pytest.approx(25 * (1 - 1e-2), rel=1e-9)  # mu (gamma - sqrt(eps))
    a, b = _views(seed=1)
    c = _views(seed=2)[0]
    obj = sdk.create("objective", "vicreg")
    three = obj(sdk.Views(embeddings=(a, b, c))).value
    pairs = (vicreg_loss(a, b) + vicreg_loss(a, c) + vicreg_loss(b, c)) / 3
    assert float(three) == pytest.approx(float(pairs), rel=1e-12)  # each term is linear in the pair


def test_a_batch_of_one_is_refused():
    z = torch.randn(1, 3)
    with pytest.raises(sdk.ShapeError, match="'vicreg'.*1 sample.*at least 2"):
        sdk.create("objective", "vicreg")(sdk.Views(embeddings=(z, z)))
