"""alignment and uniformity against explicit (double) loops and analytic values."""

import math

import pytest
import torch

import sdk
from plugins.metrics.alignment_uniformity import alignment, uniformity


def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def slow_alignment(z1, z2, alpha):
    terms = [math.sqrt(sum((a - b) ** 2 for a, b in zip(unit(u), unit(v)))) ** alpha
             for u, v in zip(z1.tolist(), z2.tolist())]
    return sum(terms) / len(terms)


def slow_uniformity(z, t):
    u = [unit(v) for v in z.tolist()]
    terms = [math.exp(-t * sum((a - b) ** 2 for a, b in zip(u[i], u[j])))
             for i in range(len(u)) for j in range(i + 1, len(u))]
    return math.log(sum(terms) / len(terms))


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_alignment_matches_loop(alpha):
    g = torch.Generator().manual_seed(int(alpha))
    z1 = torch.randn(50, 6, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert alignment(z1, z2, alpha) == pytest.approx(slow_alignment(z1, z2, alpha), rel=1e-10)
    metric = sdk.create("metric", "alignment", alpha=alpha)
    metric.update(z1[:20], z2[:20])
    metric.update(z1[20:], z2[20:])
    assert metric.compute() == pytest.approx(slow_alignment(z1, z2, alpha), rel=1e-10)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_uniformity_matches_double_loop(t):
    g = torch.Generator().manual_seed(int(4 * t))
    z = torch.randn(60, 5, generator=g, dtype=torch.float64)
    assert uniformity(z, t) == pytest.approx(slow_uniformity(z, t), rel=1e-10)
    assert uniformity(z, t, chunk_size=7) == pytest.approx(slow_uniformity(z, t), rel=1e-10)
    metric = sdk.create("metric", "uniformity", t=t)
    metric.update(z[:25])
    metric.update(z[25:])
    assert metric.compute() == pytest.approx(slow_uniformity(z, t), rel=1e-10)


def test_analytic_values():
    z = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    assert alignment(z, 5 * z) == pytest.approx(0.0, abs=1e-12)        # scale does not matter
    assert alignment(z, -z) == pytest.approx(4.0)                      # antipodal: ||2u||^2
    assert alignment(z, -z, alpha=1.0) == pytest.approx(2.0)
    assert uniformity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]), t=2) == pytest.approx(-8.0)  # log exp(-2*4)
    assert uniformity(torch.tensor([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(0.0)  # collapsed


def test_spread_points_are_more_uniform_than_clustered_ones():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(400, 3, generator=g)
    clustered = torch.tensor([1.0, 0.0, 0.0]) + 0.3 * torch.randn(400, 3, generator=g)
    assert uniformity(spread) < uniformity(clustered) - 1.0
