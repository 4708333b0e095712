"""MEOW (meow_weighted_negatives): cluster-disagreement weights against a slow loop, their
invariances, MEOW's L_info (with decoupled_contrastive) against a slow loop in value and
gradient, and the per-epoch refresh keyed by Batch.index."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.meow_weighted_negatives import meow_negative_weights
from sdk.data import IndexedDataset
from sdk.events import State


def slow_weights(clusters):
    m, b = len(clusters), len(clusters[0])
    return [[m - sum(1 for c in clusters if c[i] == c[j]) for j in range(b)] for i in range(b)]


def test_weights_match_loop_zero_diagonal_and_relabelling_invariance():
    g = torch.Generator().manual_seed(0)
    clusters = torch.stack([torch.randint(0, 3, (9,), generator=g), torch.randint(0, 5, (9,), generator=g)])
    w = meow_negative_weights(clusters)
    assert w.tolist() == slow_weights(clusters.tolist())
    assert bool((w.diagonal() == 0).all())
    relabelled = torch.stack([torch.tensor([2, 0, 1])[clusters[0]], (clusters[1] + 7) * 3])
    assert torch.equal(meow_negative_weights(relabelled), w)


class FakeTrainer:
    def __init__(self, x, index):
        self.train_loader = torch.utils.data.DataLoader(IndexedDataset(x, torch.zeros(len(x)), index),
                                                        batch_size=4)

    def embed(self, loader):
        return loader.dataset.x


def clustered_sampler(clusterings, x, index, **params):
    sampler = sdk.create("sampler", "meow_weighted_negatives", n_clusters=clusterings, **params)
    sampler.on_epoch_start(State(trainer=FakeTrainer(x, index)))
    return sampler


def test_refresh_clusters_the_trainer_embeddings_by_batch_index():
    g = torch.Generator().manual_seed(1)
    truth = torch.arange(3).repeat_interleave(5)
    x = 20 * torch.randn(3, 4, generator=g)[truth] + 0.1 * torch.randn(15, 4, generator=g)
    index = torch.randperm(15, generator=g) + 100  # Batch.index is not the row position
    sampler = clustered_sampler((3, 15), x, index, normalize=False)
    assert sampler.clusters.shape == (2, 115)
    got = sampler.clusters[0, index]
    assert torch.equal(got[:, None] == got[None, :], truth[:, None] == truth[None, :])
    assert sampler.clusters[1, index].unique().numel() == 15  # K = N: singletons
    assert bool((sampler.clusters[:, :100] == -1).all())
    # pairs of a batch: weight 2 - [same blob] between samples, 1 for positives
    rows = torch.tensor([0, 1, 5, 6])
    views = sdk.Views(embeddings=(x[rows], x[rows]))
    pairs = sampler.pairs(views, sdk.Batch(index=index[rows]))
    t = truth[rows].repeat(2)
    sample = torch.arange(4).repeat(2)
    same = sample[:, None] == sample[None, :]
    expected = torch.where(same, 1.0, 2.0 - (t[:, None] == t[None, :]).float())
    assert torch.equal(pairs.weight, expected)
    restored = sdk.create("sampler", "meow_weighted_negatives", n_clusters=(3, 15))
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.pairs(views, sdk.Batch(index=index[rows])).weight, pairs.weight)


def slow_meow(z1, z2, w, t):
    """MEOW's L_info over both views' anchors (float64): -log e^{s_ii/t} / sum_j w_ij e^{s_ij/t},
    j over every row of the other samples, w_ij by sample."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    b, total = z1.shape[0], 0.0
    for i in range(2 * b):
        p = (i + b) % (2 * b)
        den = sum(w[i % b][k % b] * torch.exp(z[i] @ z[k] / t) for k in range(2 * b) if k % b != i % b)
        total = total - (z[i] @ z[p] / t - torch.log(den))
    return total / (2 * b)


def test_decoupled_contrastive_with_meow_weights_matches_slow_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 3, generator=g)
    sampler = clustered_sampler((2, 4, 3), x, torch.arange(10), seed=5)
    w = meow_negative_weights(sampler.clusters).tolist()
    z1 = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_()
    obj = sdk.create("objective", "decoupled_contrastive", temperature=0.4, sampler=sampler)
    loss = obj(sdk.Views(embeddings=(z1, z2)), sdk.Batch(index=torch.arange(10))).value
    expected = slow_meow(z1, z2, w, 0.4)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(expected, (z1, z2))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_singleton_clustering_is_infonce_without_the_positive():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=g)
    views = sdk.Views(embeddings=(torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)))
    batch = sdk.Batch(index=torch.arange(8))
    sampler = clustered_sampler((8,), x, torch.arange(8))  # every sample its own cluster: w = 1
    weighted = sdk.create("objective", "decoupled_contrastive", temperature=0.4, sampler=sampler)
    plain = sdk.create("objective", "decoupled_contrastive", temperature=0.4)
    assert torch.allclose(weighted(views, batch).value, plain(views, batch).value, atol=1e-6)
    # before any clustering every negative weighs M: plain loss + log M
    fresh = sdk.create("sampler", "meow_weighted_negatives", n_clusters=(2, 3))
    unclustered = sdk.create("objective", "decoupled_contrastive", temperature=0.4, sampler=fresh)
    assert float(unclustered(views, batch).value) == pytest.approx(
        float(plain(views, batch).value) + math.log(2), rel=1e-5)


def test_down_weighting_same_cluster_negatives_lowers_the_loss():
    g = torch.Generator().manual_seed(4)
    truth = torch.arange(2).repeat(6)
    z = F.normalize(torch.randn(2, 8, generator=g), dim=1)[truth] + 0.2 * torch.randn(12, 8, generator=g)
    views = sdk.Views(embeddings=(z, z + 0.05 * torch.randn(12, 8, generator=g)))
    batch = sdk.Batch(index=torch.arange(12))
    sampler = clustered_sampler((2,), z, torch.arange(12))
    loss = sdk.create("objective", "nt_xent", sampler=sampler)(views, batch).value
    plain = sdk.create("objective", "nt_xent")(views, batch).value
    assert float(loss) < float(plain)  # the near-duplicates of the own class left the denominator


def test_bad_parameters_and_inputs_are_named():
    for field, value in (("n_clusters", ()), ("n_clusters", (3, 0)), ("kmeans_iters", 0)):
        with pytest.raises(sdk.ConfigError) as err:
            sdk.create("sampler", "meow_weighted_negatives", **{field: value})
        assert err.value.param == field
    sampler = sdk.create("sampler", "meow_weighted_negatives", n_clusters=(3, 20))
    with pytest.raises(sdk.ConfigError, match="exceed"):
        sampler.refresh(torch.randn(10, 2), torch.arange(10))
    views = sdk.Views(embeddings=(torch.randn(3, 2), torch.randn(3, 2)))
    with pytest.raises(sdk.RequirementError, match="Batch.index"):
        sampler.pairs(views, sdk.Batch())
