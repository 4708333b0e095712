"""PamC: block contrastive loss whose negatives are contrasted between meta-nodes (cluster sums).

Kulatilleke, Portmann & Chandra, "Efficient block contrastive learning via parameter-free
meta-node approximation", arXiv:2209.14067 (reference code github.com/gayanku/PAMC).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from plugins.neighbor_contrastive_clustering import GraphClusteringObjective
from sdk import contrastive
from sdk.card import Card
from sdk.hookspecs import hookimpl


def neighbor_positive_term(z: Tensor, adjacency: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``-log sum_j A_ij e^{tau cos(z_i, z_j)}`` per node (``cos_ii := 0``) and the mask of nodes
    with a neighbour.

    A sparse COO ``adjacency`` is evaluated edge by edge, in O(E D) time and memory.
    """
    zn = F.normalize(z.float(), dim=-1)
    n = z.shape[0]
    if not adjacency.is_sparse:
        a = adjacency.float()
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        logits = (tau * (zn @ zn.T)).masked_fill(eye, 0.0)
        valid = (a > 0).any(dim=1)
        return -contrastive.masked_logsumexp(logits, a > 0, a), valid
    a = adjacency.coalesce()
    (rows, cols), values = a.indices(), a.values().float()
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    cos = (zn[rows] * zn[cols]).sum(-1).masked_fill(rows == cols, 0.0)
    x = tau * cos + values.log()
    row_max = torch.full((n,), torch.finfo(x.dtype).min, device=z.device).scatter_reduce(
        0, rows, x.detach(), "amax", include_self=True)
    sums = torch.zeros(n, device=z.device).index_add_(0, rows, (x - row_max[rows]).exp())
    valid = sums > 0
    log_pos = torch.where(valid, sums.clamp_min(torch.finfo(x.dtype).tiny).log() + row_max,
                          torch.zeros_like(sums))
    return -log_pos, valid


def meta_nodes(z: Tensor, assignment: Tensor, n_clusters: int) -> tuple[Tensor, Tensor]:
    """Meta-nodes ``c_k = sum_{i: a_i = k} z_i`` [K, D] and the mask of non-empty clusters."""
    z = z.float()
    c = torch.zeros(n_clusters, z.shape[1], device=z.device).index_add_(0, assignment, z)
    counts = torch.zeros(n_clusters, device=z.device).index_add_(
        0, assignment, torch.ones_like(assignment, dtype=z.dtype))
    return c, counts > 0


def meta_node_negative_term(z: Tensor, assignment: Tensor, n_clusters: int, tau: float) -> Tensor:
    """``mean_k log sum_l e^{tau cos(c_k, c_l)}`` over non-empty meta-nodes (``cos_kk := 0``).

    With one node per cluster it is exactly the node-level negative term
    ``mean_i log sum_j e^{tau cos(z_i, z_j)}``; its cost is O(N D + K^2 D).
    """
    c, nonempty = meta_nodes(z, assignment, n_clusters)
    cn = F.normalize(c, dim=-1)
    eye = torch.eye(n_clusters, dtype=torch.bool, device=z.device)
    logits = (tau * (cn @ cn.T)).masked_fill(eye, 0.0)
    per_cluster = contrastive.masked_logsumexp(logits, nonempty[None, :].expand_as(logits))
    return contrastive.masked_mean(per_cluster, nonempty)


def pamc_loss(z: Tensor, adjacency: Tensor, assignment: Tensor, n_clusters: int,
              tau: float = 0.5) -> Tensor:
    """``L_PamC = -mean_i log sum_j A_ij e^{tau cos_ij} + mean_k log sum_l e^{tau cos(c_k, c_l)}``."""
    positive, valid = neighbor_positive_term(z, adjacency, tau)
    return (contrastive.masked_mean(positive, valid)
            + meta_node_negative_term(z, assignment, n_clusters, tau))


class PamCMetaNodeContrastive(GraphClusteringObjective):
    """PamC: ``alpha * L_PamC + beta * KL(P || Q)``.

    Positives are graph neighbours (``Batch.extras["adjacency"]`` [B, B], dense or sparse COO,
    or an in-batch ``knn`` graph raised to ``order``, cumulatively when ``cumulative``). The
    negatives over all node pairs are replaced by pairs of meta-nodes ``c_k``: the sums of the
    nodes whose (detached) DEC soft assignment ``q`` peaks at cluster ``k``. With a sparse
    adjacency nothing of size [B, B] is built.
    """

    plugin_name = "pamc_meta_node_contrastive"

    def __init__(self, n_clusters: int = 10, alpha: float = 2.0, beta: float = 2.0,
                 tau: float = 0.5, order: int = 4, cumulative: bool = True, knn: int = 3,
                 dof: float = 1.0, embedding_dim: int | None = None):
        super().__init__(n_clusters=n_clusters, alpha=alpha, beta=beta, tau=tau, order=order,
                         cumulative=cumulative, knn=knn, dof=dof, embedding_dim=embedding_dim)

    def contrast(self, z: Tensor, adjacency: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        positive, valid = neighbor_positive_term(z, adjacency, self.tau)
        negative = meta_node_negative_term(z, q.detach().argmax(dim=1), q.shape[1], self.tau)
        per_node = torch.where(valid, positive, torch.zeros_like(positive)) + negative
        return per_node, contrastive.masked_mean(positive, valid) + negative


CARD = Card(
    name="pamc_meta_node_contrastive", kind="objective",
    title="Efficient block contrastive learning via parameter-free meta-node approximation",
    paper="arXiv:2209.14067",
    summary="Graph-neighbour positives; all negative pairs approximated by pairs of meta-nodes "
            "(sums of the nodes of each DEC cluster), so the loss is linear in the batch size; "
            "DEC KL self-training refines the clusters.",
    formula="L = alpha * [ -mean_i log sum_j A^r_ij e^{tau cos(z_i,z_j)} + mean_k log sum_l "
            "e^{tau cos(c_k,c_l)} ] + beta * KL(P || Q); c_k = sum_{i: argmax q_i = k} z_i; "
            "cos_ii := 0, cos_kk := 0; empty clusters are skipped",
    left_out="The SDCN/AGCN graph encoders with pretrained AE weights, the six graph benchmarks and "
             "the GPU memory profiling. P is computed per batch (the reference uses the full graph); "
             "the in-batch kNN fallback is quadratic, so pass a sparse Batch.extras['adjacency'] for "
             "linear cost.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add("objective", "pamc_meta_node_contrastive", PamCMetaNodeContrastive, card=CARD)
