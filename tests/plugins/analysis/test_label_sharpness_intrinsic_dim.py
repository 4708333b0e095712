"""label_sharpness_intrinsic_dim against a pair loop, scikit-learn's neighbours with the
estimator of Pope et al. written out, and linear subspaces of known dimension."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import sdk
from plugins.analysis.label_sharpness_intrinsic_dim import intrinsic_dim_mle, label_sharpness


def slow_sharpness(x, y):
    best = 0.0
    for j in range(len(x)):
        for k in range(len(x)):
            if j != k and y[j] != y[k]:
                best = max(best, 1.0 / math.dist(x[j], x[k]))
    return best


def sklearn_mle(x, k):
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)   # column 0: the row itself
    t = dist[:, 1:k + 1]
    inv = np.log(t[:, k - 1:k] / t[:, :k - 1]).sum(1) / (k - 2)
    return 1.0 / inv.mean()


def subspace(n, d, seed, ambient=12):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(ambient, d, generator=g, dtype=torch.float64))
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ basis.T + 3.0


def test_sharpness_matches_pair_loop_and_analytic_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    assert label_sharpness(x, y, chunk_size=7) == pytest.approx(slow_sharpness(x.tolist(), y.tolist()), rel=1e-12)
    line = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
    assert label_sharpness(line, torch.tensor([0, 0, 1, 1])) == pytest.approx(2.0)     # 1 / 0.5
    assert label_sharpness(line, torch.tensor([0, 0, 0, 0])) == 0.0
    assert label_sharpness(torch.zeros(2, 2), torch.tensor([0, 1])) == math.inf          # not Lipschitz
    assert label_sharpness(torch.zeros(2, 2), torch.tensor([1, 1])) == 0.0


@pytest.mark.parametrize("k", [5, 20])
def test_mle_matches_sklearn_neighbours(k):
    x = subspace(300, 4, seed=k) + 0.05 * torch.randn(300, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert intrinsic_dim_mle(x, k=k, chunk_size=64) == pytest.approx(sklearn_mle(x.numpy(), k), rel=1e-10)


@pytest.mark.parametrize("d", [2, 5])
def test_mle_recovers_the_dimension_of_a_linear_subspace(d):
    assert intrinsic_dim_mle(subspace(800, d, seed=d)) == pytest.approx(d, abs=0.5)


def test_metric_defaults_streaming_and_resume():
    x = subspace(400, 3, seed=1)
    y = (x[:, 0] > 3.0).long()
    expected = {"label_sharpness": slow_sharpness(x[:60].tolist(), y[:60].tolist())}
    metric = sdk.create("metric", "label_sharpness_intrinsic_dim")   # k = 20, the authors' choice
    metric.update(x[:25], y[:25])
    resumed = sdk.create("metric", "label_sharpness_intrinsic_dim")
    resumed.load_state_dict(metric.state_dict())
    for m in (metric, resumed):
        m.update(x[25:60], y[25:60])
        assert m.compute()["label_sharpness"] == pytest.approx(expected["label_sharpness"], rel=1e-12)
        m.update(x[60:], y[60:])
        assert m.compute()["intrinsic_dim"] == pytest.approx(sklearn_mle(x.numpy(), 20), rel=1e-10)
    small = sdk.create("metric", "label_sharpness_intrinsic_dim")
    small.update(x[:6], y[:6])                                       # k capped at N - 1 = 5
    assert small.compute()["intrinsic_dim"] == pytest.approx(sklearn_mle(x[:6].numpy(), 5), rel=1e-10)


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "label_sharpness_intrinsic_dim")
    with pytest.raises(sdk.errors.ShapeError, match="label_sharpness_intrinsic_dim: labels"):
        metric.update(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match=r"label_sharpness_intrinsic_dim: x must be floating"):
        metric.update(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.errors.ConfigError, match="k"):
        sdk.create("metric", "label_sharpness_intrinsic_dim", k=2)
