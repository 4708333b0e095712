"""SCGC: neighbour-positive (influence-augmented) contrastive loss with DEC soft cluster labels.

Kulatilleke, Portmann & Chandra, "SCGC: Self-Supervised Contrastive Graph Clustering",
arXiv:2204.12656 (reference code github.com/gayanku/SCGC). Its graph and DEC pieces are in
:mod:`sdk.graph`.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather
from sdk.graph import GraphClusteringObjective, dec_kl, neighbor_positive_term, similarity_logits, soft_assign
from sdk.hookspecs import hookimpl

# SCGC's contrastive loss ------------------------------------------------------------------


def influence_contrastive_loss(z: Tensor, adjacency: Tensor, tau: float = 0.25) -> tuple[Tensor, Tensor]:
    """SCGC's (Graph-MLP's) neighbour contrast, per node and averaged::

        l_i = -log( sum_j A_ij e^{tau s_ij} / sum_j e^{tau s_ij} ),  s = cos, s_ii := 0

    i.e. :func:`neighbor_positive_term` plus the node-level negative term
    ``log sum_j e^{tau s_ij}``. ``A`` is the (powered) adjacency, dense or sparse; nodes without
    any neighbour are left out of the mean.
    """
    positive, valid = neighbor_positive_term(z, adjacency, tau)
    per_node = positive + torch.logsumexp(similarity_logits(z, tau), dim=1)
    per_node = torch.where(valid, per_node, torch.zeros_like(per_node))
    return per_node, contrastive.masked_mean(per_node, valid)


class NeighborContrastiveClustering(GraphClusteringObjective):
    """SCGC / SCGC*: ``alpha * L_IAC + beta * KL(P || Q)``.

    ``L_IAC`` is :func:`influence_contrastive_loss` with positives from the adjacency raised to
    ``order`` (cumulatively when ``cumulative``: SCGC*'s influence augmentation); ``Q`` are DEC
    Student-t soft assignments to learnable centres and ``P`` their sharpened target. Positives
    come from ``Batch.extras["adjacency"]`` [B, B] (the batch's rows/columns of the prepared
    graph, see :func:`subgraph`) or from an in-batch ``knn`` graph.
    """

    def __init__(self, n_clusters: Annotated[int, Ge(1)] = 10, alpha: Annotated[float, Ge(0)] = 4.0,
                 beta: Annotated[float, Ge(0)] = 0.1, tau: Annotated[float, Gt(0)] = 0.25,
                 order: Annotated[int, Ge(1)] = 4, cumulative: bool = True,
                 knn: Annotated[int, Ge(1)] = 3, dof: Annotated[float, Gt(0)] = 1.0,
                 embedding_dim: Annotated[int, Ge(1)] | None = None, gather: Gather = "auto"):
        super().__init__(n_clusters=n_clusters, alpha=alpha, beta=beta, tau=tau, order=order,
                         cumulative=cumulative, knn=knn, dof=dof, embedding_dim=embedding_dim,
                         gather=gather)

    def contrast(self, z: Tensor, adjacency: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        return influence_contrastive_loss(z, adjacency, self.tau)


def neighbor_contrastive_clustering_loss(z: Tensor, centers: Tensor, adjacency: Tensor, *,
                                         alpha: float = 4.0, beta: float = 0.1, tau: float = 0.25,
                                         dof: float = 1.0) -> Tensor:
    """``alpha * L_IAC(z, A) + beta * KL(P || Q(z, centers))`` for one view."""
    q = soft_assign(z, centers, dof)
    return alpha * influence_contrastive_loss(z, adjacency, tau)[1] + beta * dec_kl(q).mean()


CARD = Card(
    name="neighbor_contrastive_clustering", kind="objective",
    title="SCGC: Self-Supervised Contrastive Graph Clustering",
    paper="arXiv:2204.12656",
    summary="Graph neighbours (kNN or given adjacency, powered r times, cumulatively for SCGC*'s "
            "influence augmentation) are contrastive positives; DEC soft cluster labels are "
            "refined by KL self-training. Defaults are the reference code's SCGC* run on USPS "
            "(alpha 4, beta 0.1, tau 0.25, cumulative order 4, 3-NN graph, 10 clusters).",
    formula="L = alpha * mean_i -log( sum_j A^r_ij e^{tau cos_ij} / sum_j e^{tau cos_ij} ) "
            "+ beta * KL(P || Q); cos_ii := 0; A = D^-1(max(A0, A0^T) + I); "
            "q_ik ~ (1 + |z_i - mu_k|^2/v)^-(v+1)/2, p_ik ~ q_ik^2 / sum_i q_ik",
    left_out="The SDCN autoencoder backbone and its reconstruction term (plain SCGC adds MSE "
             "reconstruction; SCGC* drops it), the pretrained AE weights and the graph benchmarks. "
             "P is computed per batch (the reference computes it over the full graph); nodes "
             "without a neighbour are left out of the mean (the reference adds -log 1e-8 for them).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(NeighborContrastiveClustering, card=CARD)
