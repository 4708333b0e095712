"""Multistage contrastive learning (MCL): later stages contrast only within earlier stages'
clusters, so features suppressed by the first stage's dominant ones get learned.

Zhang, Lan, Qu, Cheng, Feng & Hooi, "Learning the Unlearned: Mitigating Feature Suppression in
Contrastive Learning", ECCV 2024 (arXiv:2402.11816; code github.com/MajorDavidZhang/MCL).
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


def stage_negatives(stage_labels: Tensor) -> Tensor:
    """Negatives [B, B] of a stage: ``j != i`` and ``c_r(j) = c_r(i)`` for every earlier stage
    ``r`` (``stage_labels`` [S, B], one row per finished stage; S = 0: every other sample)."""
    b = stage_labels.shape[1]
    keep = ~torch.eye(b, dtype=torch.bool, device=stage_labels.device)
    for c in stage_labels:  # one [B, B] comparison per finished stage
        keep &= c[:, None] == c[None, :]
    return keep


class MultistageContrastive(ResizableBuffers, Sampler):
    """Instance-discrimination pairs whose negatives shrink stage by stage.

    Stage 1 (epochs before ``stage_epochs[0]``) uses every other sample as a negative (plain
    InfoNCE with ``nt_xent``). At the start of epoch ``stage_epochs[s-1]`` the training set is
    embedded (``trainer.embed``; ``features=True``: the backbone's features) and clustered by
    k-means into ``n_clusters`` groups, labels stored per ``Batch.index``; from then on the
    negatives of anchor i are the j with ``c_r(j) = c_r(i)`` for every finished stage r.
    Positives stay the other views of the sample. The stage and the cluster labels are buffers,
    checkpointed with the run. Give it as the Trainer's ``sampler``: the engine sends its epoch
    events to it.
    """

    produces = frozenset({Input.PAIRS})

    resizable_buffers = ("labels",)

    def __init__(self, stage_epochs: Annotated[Sequence[Annotated[int, Ge(1)]], MinLen(1)] = (100,),
                 n_clusters: Annotated[int, Ge(1)] = 10, features: bool = False,
                 normalize: bool = True, kmeans_iters: Annotated[int, Ge(1)] = 50, seed: int = 0):
        super().__init__()
        stage_epochs = tuple(stage_epochs)
        if list(stage_epochs) != sorted(set(stage_epochs)):
            raise ConfigError(f"multistage_contrastive: stage_epochs must be strictly increasing, "
                              f"got {stage_epochs}", param="stage_epochs")
        self.stage_epochs, self.n_clusters = stage_epochs, n_clusters
        self.features, self.normalize, self.kmeans_iters, self.seed = (features, normalize,
                                                                       kmeans_iters, seed)
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self.register_buffer("labels", torch.full((0, 0), -1, dtype=torch.long))


    @torch.no_grad()
    def finish_stage(self, embeddings: Tensor, index: Tensor) -> None:
        """Close the current stage: cluster ``embeddings`` [N, D] (rows are samples ``index``)."""
        if embeddings.dim() != 2 or index.shape != (embeddings.shape[0],):
            raise ShapeError(f"multistage_contrastive: expected embeddings [N, D] and index [N], "
                             f"got {list(embeddings.shape)} and {list(index.shape)}")
        if self.n_clusters > embeddings.shape[0]:
            raise ConfigError(f"multistage_contrastive: n_clusters={self.n_clusters} exceeds the "
                              f"{embeddings.shape[0]} samples", param="n_clusters")
        labels, _ = kmeans(embeddings, self.n_clusters, iters=self.kmeans_iters,
                           seed=self.seed + int(self.stage), normalize=self.normalize)
        index = index.to(self.labels.device)
        size = max(int(index.max()) + 1, self.labels.shape[1])
        row = torch.full((1, size), -1, dtype=torch.long, device=self.labels.device)
        row[0, index] = labels.to(row.device)
        old = torch.full((self.labels.shape[0], size), -1, dtype=torch.long, device=row.device)
        old[:, : self.labels.shape[1]] = self.labels
        self.labels = torch.cat([old, row])
        self.stage += 1

    def on_epoch_start(self, state: State) -> None:
        """Close every stage whose boundary epoch has been reached (once each)."""
        stages = self.stage_epochs
        while int(self.stage) < len(stages) and state.epoch >= stages[int(self.stage)]:
            loader = state.trainer.train_loader
            self.finish_stage(state.trainer.embed(loader, features=self.features),
                              dataset_index(loader.dataset))

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        ids = sample_ids(views)
        same = ids[:, None] == ids[None, :]
        if self.labels.shape[0] == 0:
            return Pairs(positive=same, negative=~same)
        if batch.index is None:
            raise RequirementError("sampler 'multistage_contrastive' needs Batch.index after the "
                                   "first stage, to look up each sample's earlier clusters")
        index = batch.index.to(self.labels.device)
        negative = stage_negatives(self.labels[:, index]).to(same.device)[ids[:, None], ids[None, :]]
        return Pairs(positive=same, negative=negative & ~same)


CARD = Card(
    name="multistage_contrastive", kind="sampler",
    title="Learning the Unlearned: Mitigating Feature Suppression in Contrastive Learning",
    paper="arXiv:2402.11816",
    summary="Multistage contrastive learning: at each stage boundary the current embeddings are "
            "k-means clustered; later stages draw negatives only from the anchor's cluster in every "
            "earlier stage, so features the earlier stages already separate no longer dominate.",
    formula="stage s+1 negatives N_s(i) = {j != i : c_r(j) = c_r(i) for r = 1..s}, c_r = "
            "kmeans_K(embeddings at the end of stage r); l_i = -log e^{s_ip/t} / (e^{s_ip/t} + "
            "sum_{j in N_s(i)} e^{s_ij/t}) with nt_xent; K = 10",
    left_out="A fresh projection head per stage and the final concatenation of the stages' "
             "normalised embeddings (compose them with projection heads in the recipe), the "
             "paper's image/multimodal benchmarks. stage_epochs has no paper default (the paper "
             "trains each stage for its base method's schedule).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MultistageContrastive, card=CARD)
