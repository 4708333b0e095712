"""MEOW's adaptively weighted negatives: a negative counts less the more clusterings share its
cluster with the anchor.

Yu, Ge, Li & Zhou, "Heterogeneous Graph Contrastive Learning with Meta-path Contexts and
Adaptively Weighted Negative Samples" (arXiv:2212.13847; MEOW first appeared at SDM 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from annotated_types import Ge, MinLen
from torch import Tensor

from sdk.card import Card
from sdk.cluster import dataset_index, kmeans
from sdk.contrastive import sample_ids
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.state import ResizableBuffers
from sdk.types import Batch, Pairs, Views


def meow_negative_weights(clusters: Tensor) -> Tensor:
    """``w_ij = M - sum_m [c_m(i) = c_m(j)]`` [B, B] from ``clusters`` [M, B] (cluster id of each
    sample in each of the M clusterings; a negative id means "not clustered", sharing nothing)."""
    if clusters.dim() != 2:
        raise ShapeError(f"meow_negative_weights: expected clusters [M, B], got {list(clusters.shape)}")
    m = clusters.shape[0]
    shared = torch.zeros(clusters.shape[1], clusters.shape[1], device=clusters.device)
    for c in clusters:  # one [B, B] comparison per clustering
        shared += ((c[:, None] == c[None, :]) & (c[:, None] >= 0)).float()
    return m - shared


class MEOWWeightedNegatives(ResizableBuffers, Sampler):
    """Instance-discrimination pairs (other views of the sample positive, other samples
    negative) with negative weights :func:`meow_negative_weights` from ``len(n_clusters)``
    k-means clusterings of the training set, redone at every epoch start (``trainer.embed``,
    rows mapped to ``Batch.index`` by :func:`sdk.cluster.dataset_index`). Positives keep weight 1.

    With ``decoupled_contrastive`` (positive out of the denominator) this is MEOW's
    ``L_i = -log e^{s_ii/t} / sum_j w_ij e^{s_ij/t}`` (``w_ii = 0``); with ``nt_xent`` the
    positive stays in the denominator with weight 1. Before the first clustering no pair shares
    a cluster (every negative weighs M: plain InfoNCE up to the constant ``log M``).
    """

    produces = frozenset({Input.PAIRS, Input.PAIR_WEIGHTS})

    resizable_buffers = ("clusters",)

    def __init__(self, n_clusters: Annotated[Sequence[Annotated[int, Ge(1)]], MinLen(1)] = (100, 300),
                 normalize: bool = True, kmeans_iters: Annotated[int, Ge(1)] = 50, seed: int = 0):
        super().__init__()
        n_clusters = tuple(n_clusters)
        self.n_clusters, self.normalize, self.kmeans_iters, self.seed = (n_clusters, normalize,
                                                                         kmeans_iters, seed)
        self.register_buffer("clusters", torch.full((len(n_clusters), 0), -1, dtype=torch.long))
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.long))


    @torch.no_grad()
    def refresh(self, embeddings: Tensor, index: Tensor) -> None:
        """Re-cluster ``embeddings`` [N, D] whose rows are samples ``index`` [N] (Batch.index)."""
        if embeddings.dim() != 2 or index.shape != (embeddings.shape[0],):
            raise ShapeError(f"meow_weighted_negatives: expected embeddings [N, D] and index [N], "
                             f"got {list(embeddings.shape)} and {list(index.shape)}")
        n = embeddings.shape[0]
        too_many = [k for k in self.n_clusters if k > n]
        if too_many:
            raise ConfigError(f"meow_weighted_negatives: n_clusters {too_many} exceed the {n} "
                              "samples to cluster", param="n_clusters")
        index = index.to(self.clusters.device)
        size = max(int(index.max()) + 1, self.clusters.shape[1])
        clusters = torch.full((len(self.n_clusters), size), -1, dtype=torch.long,
                              device=self.clusters.device)
        seed = self.seed + int(self.refreshes) * len(self.n_clusters)
        for m, k in enumerate(self.n_clusters):
            labels, _ = kmeans(embeddings, k, iters=self.kmeans_iters, seed=seed + m,
                               normalize=self.normalize)
            clusters[m, index] = labels.to(clusters.device)
        self.clusters = clusters
        self.refreshes += 1

    def on_epoch_start(self, state: State) -> None:
        loader = state.trainer.train_loader
        self.refresh(state.trainer.embed(loader), dataset_index(loader.dataset))

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        if batch.index is None:
            raise RequirementError("sampler 'meow_weighted_negatives' needs Batch.index (dataset "
                                   "indices) to look up each sample's clusters")
        ids = sample_ids(views)
        same = ids[:, None] == ids[None, :]
        index, n = batch.index.to(self.clusters.device), self.clusters.shape[1]
        if n == 0:  # not clustered yet: no pair shares a cluster
            clusters = torch.full((len(self.n_clusters), index.shape[0]), -1, device=index.device)
        else:
            clusters = self.clusters[:, index.clamp(0, n - 1)].masked_fill(~(index < n), -1)
        w = meow_negative_weights(clusters).to(views.embeddings[0].device)[ids[:, None], ids[None, :]]
        weight = torch.where(same, torch.ones_like(w), w)
        return Pairs(positive=same, negative=~same, weight=weight)


CARD = Card(
    name="meow_weighted_negatives", kind="sampler",
    title="Heterogeneous Graph Contrastive Learning with Meta-path Contexts and Adaptively "
          "Weighted Negative Samples (MEOW)",
    paper="arXiv:2212.13847",
    summary="Negatives are weighted by how many of M k-means clusterings (of the whole training "
            "set, redone every epoch) put them in a different cluster from the anchor: likely "
            "false negatives count less, same-cluster-everywhere ones not at all.",
    formula="w_ij = M - sum_{m=1..M} [c_m(i) = c_m(j)] (w_ii = 0, positive weight 1); with "
            "decoupled_contrastive L_i = -log e^{s_ii/t} / sum_{j != i} w_ij e^{s_ij/t}; "
            "default K = (100, 300)",
    left_out="The ProtoNCE prototype term (lambda_proto * L_proto over the clusterings), the "
             "AdaMEOW variant with learned MLP weights, meta-path context views and the "
             "heterogeneous-graph encoders/benchmarks. The paper clusters the fine-grained view's "
             "embeddings of the full graph; here the encoder's embeddings of the training set are "
             "clustered at each epoch start and looked up by Batch.index.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MEOWWeightedNegatives, card=CARD)
