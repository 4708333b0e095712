"""SCGC (neighbor_contrastive_clustering) against explicit loops over nodes and clusters."""

import math

import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import sdk
from plugins.contrastive.neighbor_contrastive_clustering import (
    influence_contrastive_loss,
    neighbor_contrastive_clustering_loss,
)
from sdk.events import State
from sdk.graph import (
    dec_kl,
    graph_power,
    knn_graph,
    normalized_adjacency,
    soft_assign,
    subgraph,
    target_distribution,
)


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def slow_ncontrast(z, a, tau):
    """-1/|V| sum_i log( sum_j A_ij e^{tau s_ij} / sum_j e^{tau s_ij} ), s_ii = 0, over rows with
    a neighbour."""
    n, total, count = z.shape[0], 0.0, 0
    for i in range(n):
        s = [0.0 if j == i else cos(z[i], z[j]) for j in range(n)]
        pos = sum(float(a[i, j]) * math.exp(tau * s[j]) for j in range(n))
        if pos == 0:
            continue
        den = sum(math.exp(tau * s[j]) for j in range(n))
        total += -math.log(pos / den)
        count += 1
    return total / count


def slow_q(z, mu, v):
    q = []
    for zi in z:
        row = [(1 + float(((zi - m) ** 2).sum()) / v) ** (-(v + 1) / 2) for m in mu]
        q.append([r / sum(row) for r in row])
    return q


def slow_kl(q):
    n, k = len(q), len(q[0])
    f = [sum(q[i][c] for i in range(n)) for c in range(k)]
    total = 0.0
    for i in range(n):
        w = [q[i][c] ** 2 / f[c] for c in range(k)]
        p = [x / sum(w) for x in w]
        total += sum(p[c] * math.log(p[c] / q[i][c]) for c in range(k))
    return total / n


@pytest.mark.parametrize("tau", [0.25, 1.0])
def test_contrast_matches_loop_with_weighted_positives_and_isolated_node(tau):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g)
    a = torch.rand(7, 7, generator=g) * (torch.rand(7, 7, generator=g) < 0.4)
    a[3] = 0  # a node without neighbours is left out
    per_node, mean = influence_contrastive_loss(z, a, tau)
    assert mean.item() == pytest.approx(slow_ncontrast(z, a, tau), rel=1e-5)
    assert per_node[3] == 0


def test_knn_graph_matches_sklearn_neighbours():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g)
    adj = knn_graph(x, 3)
    idx = NearestNeighbors(n_neighbors=4).fit(x.numpy()).kneighbors(x.numpy())[1][:, 1:]
    expected = torch.zeros(20, 20)
    expected[torch.arange(20)[:, None], torch.as_tensor(idx)] = 1
    assert torch.equal(adj, expected)


def test_normalized_adjacency_and_cumulative_power():
    a = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    n = normalized_adjacency(a)
    sym = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.float)
    assert torch.allclose(n, sym / sym.sum(1, keepdim=True))
    assert torch.allclose(graph_power(n, 3, cumulative=True), n + n @ n + n @ n @ n)
    assert torch.allclose(graph_power(n, 3), n @ n @ n)
    sparse = graph_power(n.to_sparse(), 3, cumulative=True)
    assert torch.allclose(sparse.to_dense(), graph_power(n, 3, cumulative=True))
    idx = torch.tensor([3, 0])
    assert torch.equal(subgraph(n.to_sparse(), idx).to_dense(), n[idx][:, idx])


def test_dec_assignment_target_and_kl_match_loops():
    g = torch.Generator().manual_seed(2)
    z, mu = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    for v in (1.0, 2.5):
        q = soft_assign(z, mu, v)
        assert torch.allclose(q, torch.tensor(slow_q(z, mu, v)), atol=1e-6)
    q = soft_assign(z, mu)
    assert torch.allclose(target_distribution(q).sum(1), torch.ones(6))
    assert dec_kl(q).mean().item() == pytest.approx(slow_kl(q.tolist()), rel=1e-5)


def test_objective_value_is_alpha_contrast_plus_beta_kl_with_given_adjacency():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=g)
    adj = graph_power(normalized_adjacency(knn_graph(torch.randn(6, 2, generator=g), 2)), 2, True)
    obj = sdk.create("objective", "neighbor_contrastive_clustering", n_clusters=3, alpha=2.0,
                     beta=0.5, tau=0.5, embedding_dim=4)
    loss = obj(sdk.Views(embeddings=(z,)), sdk.Batch(extras={"adjacency": adj}))
    mu = obj.clustering.centers.detach()
    expected = 2.0 * slow_ncontrast(z, adj, 0.5) + 0.5 * slow_kl(slow_q(z, mu, 1.0))
    assert loss.value.item() == pytest.approx(expected, rel=1e-5)
    assert loss.per_sample.mean().item() == pytest.approx(expected, rel=1e-5)
    functional = neighbor_contrastive_clustering_loss(z, mu, adj, alpha=2.0, beta=0.5, tau=0.5)
    assert functional.item() == pytest.approx(expected, rel=1e-5)


def test_in_batch_graph_comes_from_features_and_given_adjacency_wins():
    g = torch.Generator().manual_seed(4)
    z, feats = torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)
    obj = sdk.create("objective", "neighbor_contrastive_clustering", n_clusters=2, beta=0.0,
                     alpha=1.0, order=2, cumulative=False, knn=2, embedding_dim=4)
    expected = slow_ncontrast(z, graph_power(normalized_adjacency(knn_graph(feats, 2)), 2), 0.25)
    got = obj(sdk.Views(embeddings=(z,), extras={"features": (feats,)})).value
    assert got.item() == pytest.approx(expected, rel=1e-5)
    eye = obj(sdk.Views(embeddings=(z,)), sdk.Batch(extras={"adjacency": torch.eye(8)})).value
    assert eye.item() == pytest.approx(slow_ncontrast(z, torch.eye(8), 0.25), rel=1e-5)
    with pytest.raises(sdk.ShapeError, match="adjacency"):
        obj(sdk.Views(embeddings=(z,)), sdk.Batch(extras={"adjacency": torch.eye(7)}))


def test_on_fit_start_initialises_centres_by_kmeans_once():
    g = torch.Generator().manual_seed(5)
    data = torch.cat([torch.randn(30, 2, generator=g) + 6, torch.randn(30, 2, generator=g) - 6])

    class FakeTrainer:
        train_loader = None

        def embed(self, loader):
            return data

    obj = sdk.create("objective", "neighbor_contrastive_clustering", n_clusters=2)
    obj.on_fit_start(State(trainer=FakeTrainer()))
    centres = obj.clustering.centers.detach()
    assert sorted(centres[:, 0].round().tolist()) == pytest.approx([-6, 6], abs=1)
    assert bool(obj.clustering.initialised)
    restored = sdk.create("objective", "neighbor_contrastive_clustering", n_clusters=2)
    restored.load_state_dict(obj.state_dict())
    data = data + 100  # a resumed run keeps its centres
    restored.on_fit_start(State(trainer=FakeTrainer()))
    assert torch.equal(restored.clustering.centers, obj.clustering.centers)


def test_bad_hyperparameters_are_named():
    with pytest.raises(sdk.ConfigError) as err:
        sdk.create("objective", "neighbor_contrastive_clustering", tau=0.0)
    assert err.value.param == "tau"


def torch_ncontrast(z, a, tau):
    """Differentiable float64 node loop of the same loss (sparse adjacencies densified)."""
    a = a.to_dense() if a.is_sparse else a
    terms = []
    for i in range(z.shape[0]):
        s = torch.stack([torch.zeros((), dtype=z.dtype) if j == i else
                         torch.dot(z[i], z[j]) / (z[i].norm() * z[j].norm()) for j in range(z.shape[0])])
        pos = (a[i].to(z.dtype) * torch.exp(tau * s)).sum()
        if pos > 0:
            terms.append(-torch.log(pos / torch.exp(tau * s).sum()))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("sparse", [False, True])
def test_contrast_gradient_matches_loop(sparse):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a = graph_power(normalized_adjacency(knn_graph(torch.randn(7, 3, generator=g), 2)), 2, True)
    a[5] = 0  # isolated node: no loss, no gradient through its row
    got = influence_contrastive_loss(z, a.to_sparse() if sparse else a, 0.25)[1]
    ref = torch_ncontrast(z, a, 0.25)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g_got, = torch.autograd.grad(got, z)
    g_ref, = torch.autograd.grad(ref, z)
    assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_registered_with_the_reference_usps_scgc_star_defaults():
    obj = sdk.create("objective", "neighbor_contrastive_clustering")
    assert (obj.alpha, obj.beta, obj.tau, obj.order, obj.cumulative, obj.knn) == (4.0, 0.1, 0.25, 4,
                                                                                  True, 3)
    assert (obj.clustering.n_clusters, obj.clustering.dof) == (10, 1.0)
