"""Tests of the template's plugin: paperplug's conformance kit plus an independent formula."""

from __future__ import annotations

import pytest
import sdk
import torch
from sdk.testing import Plugin, check_distributed, check_plugin

from paperplug_template.vicreg import VICReg, vicreg_loss


def test_conformance():
    """The kit paperplug runs over its own plugins: defaults, gradients, bf16, errors, card."""
    # builtin: paper and formula required too
    check_plugin("objective", "template_vicreg", builtin=True)


def test_two_ranks_equal_one_process_on_both_batches():
    """Batch-coupled (batch_coupled = True): 2 gloo processes with the default gather give the
    loss and gradients of one process on the concatenated batch."""
    check_distributed([Plugin("objective", "template_vicreg")])


def test_discovered_through_the_entry_point():
    card = next(c for c in sdk.plugins("objective") if c.name == "template_vicreg")
    assert card.package == "paperplug-plugin-template"
    assert {p.name: p.default for p in card.params} == {
        "lambd": 25.0, "mu": 25.0, "nu": 1.0, "gamma": 1.0, "eps": 1e-4, "gather": "auto"}
    assert {p.name: p.constraint for p in card.params} == {
        "lambd": ">= 0", "mu": ">= 0", "nu": ">= 0", "gamma": "> 0", "eps": "> 0", "gather": ""}
    assert isinstance(sdk.create("objective", "template_vicreg"), VICReg)


@pytest.mark.parametrize("build", [lambda **kw: sdk.create("objective", "template_vicreg", **kw),
                                   VICReg])
def test_declared_constraints_are_checked(build):
    """``sdk.create`` and direct construction check the constraints of the signature."""
    sdk.plugins()  # registered: messages name the card
    with pytest.raises(sdk.ConfigError,
                       match=r"^template_vicreg: gamma must be > 0, got 0$") as info:
        build(gamma=0)
    assert info.value.param == "gamma"
    with pytest.raises(sdk.ConfigError, match=r"^template_vicreg: mu must be >= 0, got -1.0$"):
        build(mu=-1.0)


def slow_vicreg(z1, z2, lambd, mu, nu, gamma, eps):
    """Eq. (6) of the paper, written out with explicit loops in float64."""
    z1, z2 = z1.double().tolist(), z2.double().tolist()
    n, d = len(z1), len(z1[0])
    s = sum((z1[i][k] - z2[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def v_and_c(z):
        mean = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        cov = [[sum((z[i][a] - mean[a]) * (z[i][b] - mean[b]) for i in range(n)) / (n - 1)
                for b in range(d)] for a in range(d)]
        v = sum(max(0.0, gamma - (cov[j][j] + eps) ** 0.5) for j in range(d)) / d
        c = sum(cov[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
        return v, c

    v1, c1 = v_and_c(z1)
    v2, c2 = v_and_c(z2)
    return lambd * s + mu * (v1 + v2) + nu * (c1 + c2), (s, v1 + v2, c1 + c2)


@pytest.mark.parametrize("scale", [0.3, 2.0])  # below / above gamma: the hinge on and off
def test_matches_the_paper_formula(scale):
    g = torch.Generator().manual_seed(0)
    z1 = scale * torch.randn(12, 6, generator=g)
    z2 = z1 + 0.5 * torch.randn(12, 6, generator=g)
    params = dict(lambd=3.0, mu=7.0, nu=2.0, gamma=1.0, eps=1e-4)
    expected, (s, v, c) = slow_vicreg(z1, z2, **params)
    loss = sdk.create("objective", "template_vicreg", **params)(sdk.Views(embeddings=(z1, z2)))
    close = dict(rtol=1e-5, atol=1e-6)  # float32 loss against the float64 reference
    torch.testing.assert_close(loss.value.item(), expected, **close)
    for key, value in (("invariance", s), ("variance", v), ("covariance", c)):
        torch.testing.assert_close(loss.logs[key].item(), value, **close)
    torch.testing.assert_close(vicreg_loss(z1, z2, **params), loss.value)


def test_collapse_is_penalised_and_spread_is_not():
    """A collapsed batch pays mu * 2 * gamma; whitened, identical views pay nothing."""
    collapsed = torch.ones(16, 4)
    loss = sdk.create("objective", "template_vicreg")(sdk.Views(embeddings=(collapsed, collapsed)))
    torch.testing.assert_close(loss.value, torch.tensor(25.0 * 2 * (1 - 1e-4 ** 0.5)))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    q = torch.linalg.qr(x - x.mean(0))[0]  # zero-mean, orthonormal columns
    z = q * 1.5 * 63 ** 0.5  # covariance exactly 2.25 * I: std above gamma, no correlation
    loss = sdk.create("objective", "template_vicreg")(sdk.Views(embeddings=(z, z)))
    torch.testing.assert_close(loss.value, torch.tensor(0.0), atol=1e-5, rtol=0)


def test_three_views_average_the_pairs():
    g = torch.Generator().manual_seed(2)
    zs = [torch.randn(10, 5, generator=g) for _ in range(3)]
    loss = VICReg()(sdk.Views(embeddings=tuple(zs)))
    pairs = [vicreg_loss(zs[a], zs[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    torch.testing.assert_close(loss.value, torch.stack(pairs).mean())


def test_bad_parameters_name_themselves():
    with pytest.raises(sdk.ConfigError, match="gamma"):
        sdk.create("objective", "template_vicreg", gamma=0.0)
    with pytest.raises(sdk.ConfigError, match="mu"):
        sdk.create("objective", "template_vicreg", mu=-1.0)
    with pytest.raises(sdk.ShapeError, match="at least 2"):
        VICReg()(sdk.Views(embeddings=(torch.randn(1, 3), torch.randn(1, 3))))
