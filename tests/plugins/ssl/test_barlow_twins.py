"""Barlow Twins against an explicit double loop and its analytic optimum."""

import pytest
import torch

import sdk
from plugins.ssl.barlow_twins import barlow_twins_loss


def slow(z1, z2, lambd, eps=1e-5):
    n, d = z1.shape

    def norm(z):
        mean = [sum(float(z[b, i]) for b in range(n)) / n for i in range(d)]
        var = [sum((float(z[b, i]) - mean[i]) ** 2 for b in range(n)) / n for i in range(d)]
        return [[(float(z[b, i]) - mean[i]) / (var[i] + eps) ** 0.5 for i in range(d)] for b in range(n)]

    a, b = norm(z1), norm(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c ** 2
    return loss


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_matches_loop(lambd):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(slow(z1, z2, lambd), rel=1e-5)


def test_zero_at_decorrelated_identical_views():
    # zero-mean orthonormal columns: the batch-normalised cross-correlation is the identity
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    z, _ = torch.linalg.qr(z - z.mean(0))
    assert barlow_twins_loss(z, z).item() == pytest.approx(0.0, abs=1e-3)


def test_default_and_views_average():
    obj = sdk.create("objective", "barlow_twins")
    assert obj.lambd == 5e-3
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(8, 3, generator=g) for _ in range(3))
    three = obj(sdk.Views(embeddings=(a, b, c))).value
    pairs = (barlow_twins_loss(a, b) + barlow_twins_loss(a, c) + barlow_twins_loss(b, c)) / 3
    assert torch.allclose(three, pairs)
