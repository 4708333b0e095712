"""sdk.cluster: k-means recovers separated blobs, is seeded, reaches scikit-learn's inertia,
is a fixed point of Lloyd's algorithm, warm-starts from given centres, and the dataset index
helper follows IndexedDataset."""

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler

from sdk.cluster import dataset_index, kmeans
from sdk.data import IndexedDataset
from sdk.errors import ConfigError, ShapeError


def blobs(seed=0, k=4, per=30, d=5, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(k, d, generator=g)
    truth = torch.arange(k).repeat_interleave(per)
    return centres[truth] + spread * torch.randn(k * per, d, generator=g), truth


def same_partition(a, b):
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_recovers_separated_blobs_and_is_seeded():
    x, truth = blobs()
    labels, centres = kmeans(x, 4, seed=3)
    assert same_partition(labels, truth)
    for c in range(4):  # each centre is the mean of its members
        assert torch.allclose(centres[c], x[labels == c].mean(0), atol=1e-5)
    again, _ = kmeans(x, 4, seed=3)
    assert torch.equal(labels, again)


def test_one_lloyd_step_matches_a_loop():
    x, _ = blobs(seed=1, spread=1.0)
    labels, centres = kmeans(x, 3, iters=25, seed=0)
    # a fixed point of Lloyd's algorithm: every point is closest to its own centre
    for i in range(x.shape[0]):
        d = [float((x[i] - centres[c]).pow(2).sum()) for c in range(3)]
        assert d[int(labels[i])] == pytest.approx(min(d), rel=1e-5, abs=1e-6)


def test_normalize_clusters_directions():
    g = torch.Generator().manual_seed(2)
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    truth = torch.arange(2).repeat_interleave(20)
    scale = torch.rand(40, 1, generator=g) * 10 + 0.1  # norms vary wildly along each direction
    x = dirs[truth] * scale + 0.01 * torch.randn(40, 2, generator=g)
    labels, centres = kmeans(x, 2, normalize=True)
    assert same_partition(labels, truth)
    assert torch.allclose(centres.norm(dim=1), torch.ones(2), atol=1e-3)


def test_errors_and_k_equal_n():
    x, _ = blobs(per=2)
    with pytest.raises(ConfigError, match="k"):
        kmeans(x, 0)
    labels, _ = kmeans(x, x.shape[0])
    assert labels.unique().numel() == x.shape[0]  # no empty cluster survives


def test_dataset_index():
    ds = IndexedDataset(torch.zeros(3, 2), torch.zeros(3), torch.tensor([7, 2, 9]))
    assert dataset_index(ds).tolist() == [7, 2, 9]
    assert dataset_index(torch.utils.data.TensorDataset(torch.zeros(4))).tolist() == [0, 1, 2, 3]


def inertia(x, labels, centres):
    return float(((x - centres[labels]) ** 2).sum())


def test_reaches_sklearn_inertia_on_wine():
    x = torch.tensor(StandardScaler().fit_transform(load_wine().data), dtype=torch.float32)
    best = min(inertia(x, *kmeans(x, 3, seed=s)) for s in range(5))
    ref = KMeans(3, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert best == pytest.approx(ref, rel=1e-3)


def test_assignment_is_nearest_centre_and_centres_are_means():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    labels, centres = kmeans(x, 5, iters=100, tol=0.0)
    assert torch.equal(labels, torch.cdist(x, centres).argmin(1))
    for c in range(5):
        assert torch.allclose(centres[c], x[labels == c].mean(0), atol=1e-5)


def test_init_warm_starts_from_given_centres():
    x, truth = blobs(seed=4, k=3)
    means = torch.stack([x[truth == c].mean(0) for c in range(3)])
    labels, centres = kmeans(x, 3, init=means.flip(0), iters=1)  # already a fixed point
    assert torch.equal(labels, 2 - truth)
    assert torch.allclose(centres, means.flip(0), atol=1e-5)
    # a single Lloyd step from given centres: assign to the nearest, then average
    init = torch.randn(3, x.shape[1], generator=torch.Generator().manual_seed(1))
    _, one = kmeans(x, 3, init=init, iters=1, tol=0.0)
    first = torch.cdist(x, init).argmin(1)
    for c in range(3):
        if (first == c).any():
            assert torch.allclose(one[c], x[first == c].mean(0), atol=1e-5)
    with pytest.raises(ShapeError, match="init"):
        kmeans(x, 3, init=torch.zeros(2, x.shape[1]))
