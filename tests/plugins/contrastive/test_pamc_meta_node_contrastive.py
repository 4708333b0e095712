"""PamC against explicit loops; exact when every node is its own meta-node; linear memory."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdk
from plugins.contrastive.neighbor_contrastive_clustering import influence_contrastive_loss
from plugins.contrastive.pamc_meta_node_contrastive import (
    meta_node_negative_term,
    neighbor_positive_term,
    pamc_loss,
)
from sdk.graph import (
    graph_power,
    knn_graph,
    normalized_adjacency,
    soft_assign,
)


def cos(a, b):
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb)


def slow_positive(z, a, tau):
    terms = []
    for i in range(z.shape[0]):
        s = sum(float(a[i, j]) * math.exp(tau * (0.0 if i == j else cos(z[i], z[j])))
                for j in range(z.shape[0]) if a[i, j] > 0)
        if s > 0:
            terms.append(-math.log(s))
    return sum(terms) / len(terms)


def slow_negative(z, assign, k, tau):
    c = [sum((z[i] for i in range(z.shape[0]) if assign[i] == m), torch.zeros(z.shape[1]))
         for m in range(k)]
    live = [m for m in range(k) if any(a == m for a in assign)]
    return sum(math.log(sum(math.exp(tau * (0.0 if m == l else cos(c[m], c[l]))) for l in live))
               for m in live) / len(live)


def graph(n, seed):
    g = torch.Generator().manual_seed(seed)
    return graph_power(normalized_adjacency(knn_graph(torch.randn(n, 3, generator=g), 2)), 2, True)


@pytest.mark.parametrize("tau", [0.5, 1.5])
def test_positive_term_dense_sparse_and_loop_agree(tau):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 4, generator=g)
    a = graph(9, 1)
    a[4] = 0  # isolated node: left out
    dense, valid = neighbor_positive_term(z, a, tau)
    sparse, valid_s = neighbor_positive_term(z, a.to_sparse(), tau)
    assert torch.equal(valid, valid_s) and not valid[4]
    assert torch.allclose(dense[valid], sparse[valid], atol=1e-6)
    assert (dense[valid].mean().item()) == pytest.approx(slow_positive(z, a, tau), rel=1e-5)


def test_meta_node_negative_term_matches_loop_with_an_empty_cluster():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(10, 3, generator=g)
    assign = torch.tensor([0, 0, 1, 3, 3, 3, 1, 0, 3, 1])  # cluster 2 is empty
    got = meta_node_negative_term(z, assign, 4, 0.5)
    assert got.item() == pytest.approx(slow_negative(z, assign.tolist(), 4, 0.5), rel=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_singleton_meta_nodes_give_the_exact_node_pair_loss(sparse):
    """With K = N and one node per cluster, PamC equals the full block contrastive loss it
    approximates (Graph-MLP / SCGC's Ncontrast), which is also checked by a loop."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 5, generator=g)
    a = graph(8, 4)
    exact = influence_contrastive_loss(z, a, 0.5)[1]
    ident = torch.randperm(8, generator=g)  # any one-to-one assignment
    got = pamc_loss(z, a.to_sparse() if sparse else a, ident, 8, tau=0.5)
    assert got.item() == pytest.approx(exact.item(), rel=1e-5)
    node_level = sum(math.log(sum(math.exp(0.5 * (0.0 if i == j else cos(z[i], z[j])))
                                  for j in range(8))) for i in range(8)) / 8
    assert got.item() == pytest.approx(slow_positive(z, a, 0.5) + node_level, rel=1e-5)


def test_objective_is_alpha_pamc_plus_beta_kl_with_argmax_meta_nodes():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(12, 4, generator=g)
    a = graph(12, 6)
    obj = sdk.create("objective", "pamc_meta_node_contrastive", n_clusters=3, alpha=2.0, beta=2.0,
                     tau=0.5, embedding_dim=4)
    loss = obj(sdk.Views(embeddings=(z,)), sdk.Batch(extras={"adjacency": a.to_sparse()}))
    q = soft_assign(z, obj.clustering.centers.detach())
    w = q.pow(2) / q.sum(0)
    p = w / w.sum(1, keepdim=True)
    kl = float((p * (p / q).log()).sum(1).mean())
    expected = 2.0 * (slow_positive(z, a, 0.5) + slow_negative(z, q.argmax(1).tolist(), 3, 0.5)) + 2.0 * kl
    assert loss.value.item() == pytest.approx(expected, rel=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self.largest = max(self.largest, t.numel())
        return out


def test_meta_node_loss_never_builds_a_batch_by_batch_matrix():
    b, d = 600, 8
    g = torch.Generator().manual_seed(7)
    z = torch.randn(b, d, generator=g, requires_grad=True)
    nbrs = torch.randint(b, (b, 3), generator=g)
    rows = torch.arange(b).repeat_interleave(3)
    adj = torch.sparse_coo_tensor(torch.stack([rows, nbrs.flatten()]), torch.full((3 * b,), 1 / 3),
                                  (b, b))
    obj = sdk.create("objective", "pamc_meta_node_contrastive", n_clusters=10, embedding_dim=d)
    with LargestTensor() as pamc:
        obj(sdk.Views(embeddings=(z,)), sdk.Batch(extras={"adjacency": adj})).value.backward()
    assert pamc.largest < b * b / 10  # linear: O(B * max(D, K, degree))
    scgc = sdk.create("objective", "neighbor_contrastive_clustering", n_clusters=10, embedding_dim=d)
    with LargestTensor() as full:
        scgc(sdk.Views(embeddings=(z,)), sdk.Batch(extras={"adjacency": adj})).value.backward()
    assert full.largest >= b * b  # the exact node-pair loss is quadratic


def torch_pamc(z, a, assign, k, tau):
    """Differentiable float64 loop of L_PamC: node-level positives, meta-node negatives."""
    def c(u, v):
        return torch.dot(u, v) / (u.norm() * v.norm())
    pos = []
    for i in range(z.shape[0]):
        s = sum(a[i, j] * torch.exp(tau * (torch.zeros((), dtype=z.dtype) if i == j else c(z[i], z[j])))
                for j in range(z.shape[0]) if a[i, j] > 0)
        pos.append(-torch.log(s))
    live = sorted(set(assign))
    cent = {m: sum(z[i] for i in range(z.shape[0]) if assign[i] == m) for m in live}
    neg = [torch.log(sum(torch.exp(tau * (torch.zeros((), dtype=z.dtype) if m == n else c(cent[m], cent[n])))
                         for n in live)) for m in live]
    return torch.stack(pos).mean() + torch.stack(neg).mean()


@pytest.mark.parametrize("sparse", [False, True])
def test_pamc_gradient_matches_loop(sparse):
    g = torch.Generator().manual_seed(9)
    z = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    a = graph(9, 10).double()
    assign = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0])
    got = pamc_loss(z, a.to_sparse() if sparse else a, assign, 4, tau=0.5)  # cluster 3 empty
    ref = torch_pamc(z, a, assign.tolist(), 4, 0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g_got, = torch.autograd.grad(got, z)
    g_ref, = torch.autograd.grad(ref, z)
    assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_registered_with_the_reference_usps_defaults():
    obj = sdk.create("objective", "pamc_meta_node_contrastive")
    assert (obj.alpha, obj.beta, obj.tau, obj.order, obj.cumulative, obj.knn) == (2.0, 2.0, 0.5, 4,
                                                                                  True, 3)
    assert obj.clustering.n_clusters == 10
    with pytest.raises(sdk.ConfigError) as err:
        sdk.create("objective", "pamc_meta_node_contrastive", order=0)
    assert err.value.param == "order"
