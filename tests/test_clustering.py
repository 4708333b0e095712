"""sdk.clustering: k-means against scikit-learn, dataset-ordered embeddings."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler

from sdk.clustering import kmeans, ordered_embeddings


def test_kmeans_reaches_sklearn_inertia_on_wine():
    x = torch.tensor(StandardScaler().fit_transform(load_wine().data), dtype=torch.float32)
    best = min(float(((x - c[a]) ** 2).sum()) for c, a in
               (kmeans(x, 3, generator=torch.Generator().manual_seed(s)) for s in range(5)))
    ref = KMeans(3, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert best == pytest.approx(ref, rel=1e-3)


def test_kmeans_assignment_is_nearest_centre_and_centres_are_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    c, a = kmeans(x, 5, generator=g, iters=100)
    assert torch.equal(a, torch.cdist(x, c).argmin(1))
    for k in range(5):
        assert torch.allclose(c[k], x[a == k].mean(0), atol=1e-5)


def test_kmeans_rejects_bad_k():
    with pytest.raises(ValueError, match="k="):
        kmeans(torch.randn(3, 2), 4)


def test_ordered_embeddings_follow_dataset_order_despite_shuffling():
    data = torch.arange(10.0)[:, None].repeat(1, 3)
    ds = torch.utils.data.TensorDataset(data)

    class FakeTrainer:
        train_loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)

        def embed(self, loader):
            return torch.cat([x for (x,) in loader]) * 2

    out = ordered_embeddings(FakeTrainer())
    assert torch.equal(out, data * 2)
    assert np.allclose(out[:, 0].numpy(), np.arange(10) * 2)
