"""rankme against numpy's SVD, analytic ranks and the paper's invariances."""

import numpy as np
import pytest
import torch

import sdk
from plugins.metrics.rankme import rankme


def numpy_rankme(z, eps=1e-7):
    s = np.linalg.svd(z, compute_uv=False)
    p = s / np.abs(s).sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(200, 16), (10, 32)])
def test_matches_numpy_svd(shape):
    g = torch.Generator().manual_seed(shape[0])
    z = torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(0.01, 3, shape[1]))
    expected = numpy_rankme(z.double().numpy())
    assert rankme(z) == pytest.approx(expected, rel=1e-9)
    metric = sdk.create("metric", "rankme")
    for chunk in z.split(7):
        metric.update(chunk)
    assert metric.compute() == pytest.approx(expected, rel=1e-6)


def test_analytic_ranks():
    assert rankme(torch.eye(16)) == pytest.approx(16, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(64, 5, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64))
    assert rankme(3 * left @ right.T) == pytest.approx(5, rel=1e-4)  # 5 equal singular values
    rank_one = torch.randn(100, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 24, generator=g, dtype=torch.float64)
    assert rankme(rank_one) == pytest.approx(1, abs=1e-4)        # collapse
    assert rankme(rank_one, eps=0.0) == pytest.approx(1, abs=1e-6)


def test_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(100, 8, generator=g, dtype=torch.float64) * torch.arange(1, 9)
    rot, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert rankme(7.5 * z @ rot) == pytest.approx(rankme(z), rel=1e-10)
    assert 1 < rankme(z) < 8
