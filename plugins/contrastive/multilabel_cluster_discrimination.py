"""MLCD: multi-label cluster discrimination with a learnable centre bank.

An, Yang, Dai, Feng & Deng, "Multi-label Cluster Discrimination for Visual Representation
Learning", ECCV 2024, arXiv:2407.17331 (reference code github.com/deepglint/unicom).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk import contrastive
from sdk.card import Card
from sdk.cluster import dataset_index, kmeans
from sdk.distributed import Gather, broadcast_from_main, gather_no_grad, resolve_gather
from sdk.errors import ConfigError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.state import ResizableBuffers
from sdk.types import Batch, Loss, Views


def multilabel_cluster_loss(cos: Tensor, positives: Tensor, *, scale: float = 32.0, margin: float = 0.0,
                            class_mask: Tensor | None = None) -> Tensor:
    """Per-sample MLCD loss [B] from cosines ``cos`` [B, K] to the centres::

        l = log(1 + sum_{i in pos} e^{-s (c_i - m)}) + log(1 + sum_{j in neg} e^{s (c_j + m)})

    ``positives`` [B, l] are centre ids; negatives are all other centres where ``class_mask``
    [K] (the sampled classes) is true. 0 is the shared decision threshold of every class.
    """
    cos = cos.float()
    pos = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, positives, True)
    neg = ~pos if class_mask is None else ~pos & class_mask[None, :]
    pos_term = contrastive.masked_logsumexp(-scale * (cos - margin), pos)
    neg_term = contrastive.masked_logsumexp(scale * (cos + margin), neg)
    return F.softplus(pos_term) + F.softplus(neg_term)


def sample_classes(positives: Tensor, n_classes: int, ratio: float, *, shared: bool = False) -> Tensor:
    """PartialFC-style class sampling: a [K] mask holding every positive class of the batch and
    random other classes, ``max(ceil(ratio * K), #positives)`` classes in all. ``shared``:
    every DDP rank uses rank 0's draw (``positives`` then hold every rank's)."""
    if ratio >= 1:
        return torch.ones(n_classes, dtype=torch.bool, device=positives.device)
    scores = torch.rand(n_classes, device=positives.device)
    if shared:
        scores = broadcast_from_main(scores)
    scores[positives.flatten()] = 2.0
    keep = torch.zeros(n_classes, dtype=torch.bool, device=positives.device)
    keep[scores.topk(max(1, math.ceil(ratio * n_classes))).indices] = True
    keep[positives.flatten()] = True
    return keep


class MultilabelClusterDiscrimination(ResizableBuffers, Objective):
    """MLCD: each sample's ``num_positives`` nearest cluster centres are its labels, and
    :func:`multilabel_cluster_loss` scores its cosines to a learnable, normalised centre bank,
    with negative classes sampled at ``negative_ratio``.

    At fit start the centres are initialised by spherical k-means over the training set
    (``trainer.embed``) and every sample's positives are stored in a buffer keyed by
    ``Batch.index`` (the paper's offline clustering); ``recluster=True`` repeats this at every
    epoch end. Samples without a stored assignment use their current nearest centres. The
    sampled negative classes couple the samples of a batch: ``gather`` ("auto": under DDP)
    samples one class set for the global batch (every rank's positives, rank 0's draw).
    """

    batch_coupled = True

    resizable_buffers = ("assignments",)

    requires = {"views": 1}

    def __init__(self, n_clusters: Annotated[int, Ge(2)] = 100, num_positives: Annotated[int, Ge(1)] = 3,
                 scale: Annotated[float, Gt(0)] = 32.0, margin: Annotated[float, Ge(0)] = 0.0,
                 negative_ratio: Annotated[float, Interval(gt=0, le=1)] = 0.1,
                 embedding_dim: Annotated[int, Ge(1)] | None = None,
                 recluster: bool = False, seed: int = 0, gather: Gather = "auto"):
        super().__init__()
        if not num_positives < n_clusters:
            raise ConfigError(f"multilabel_cluster_discrimination: num_positives={num_positives!r} "
                              f"must be < n_clusters={n_clusters!r}", param="num_positives")
        self.n_clusters, self.num_positives = n_clusters, num_positives
        self.scale, self.margin, self.negative_ratio = scale, margin, negative_ratio
        self.recluster, self.seed, self.gather = recluster, seed, gather
        self.centres = (nn.Parameter(F.normalize(torch.randn(n_clusters, embedding_dim), dim=1))
                        if embedding_dim else nn.UninitializedParameter())
        self.register_buffer("assignments", torch.zeros(0, num_positives, dtype=torch.long))
        self.register_buffer("initialised", torch.tensor(False))

    def _materialise(self, dim: int, device: torch.device) -> None:
        if isinstance(self.centres, nn.UninitializedParameter):
            self.centres.materialize((self.n_clusters, dim), device=device)
            with torch.no_grad():
                g = torch.Generator(device="cpu").manual_seed(self.seed)
                self.centres.copy_(F.normalize(torch.randn(self.n_clusters, dim, generator=g), dim=1))

    def cosines(self, z: Tensor) -> Tensor:
        self._materialise(z.shape[1], z.device)
        return F.normalize(z.float(), dim=1) @ F.normalize(self.centres.float(), dim=1).T

    @torch.no_grad()
    def cluster(self, embeddings: Tensor, index: Tensor) -> None:
        """Centres <- spherical k-means centroids of ``embeddings`` [N, D]; the samples
        ``index`` [N] get their ``num_positives`` nearest centres as labels."""
        self._materialise(embeddings.shape[1], embeddings.device)
        _, centres = kmeans(embeddings, self.n_clusters, normalize=True, seed=self.seed)
        self.centres.copy_(F.normalize(centres, dim=1))
        top = self.cosines(embeddings).topk(self.num_positives, dim=1).indices
        index = index.to(top.device)
        table = torch.full((int(index.max()) + 1, self.num_positives), -1, dtype=torch.long,
                           device=top.device)
        table[index] = top
        self.assignments = table
        self.initialised.fill_(True)

    def _refresh(self, trainer: Any) -> None:
        loader = trainer.train_loader
        self.cluster(trainer.embed(loader), dataset_index(loader.dataset))

    def on_fit_start(self, state: State) -> None:
        if not bool(self.initialised):
            self._refresh(state.trainer)

    def on_epoch_end(self, state: State) -> None:
        if self.recluster:
            self._refresh(state.trainer)

    def positives(self, cos: Tensor, batch: Batch) -> Tensor:
        """Stored labels of the batch's samples where known, else the current nearest centres."""
        nearest = cos.detach().topk(self.num_positives, dim=1).indices
        if batch.index is None or self.assignments.shape[0] == 0:
            return nearest
        idx = batch.index.to(self.assignments.device)
        known = idx < self.assignments.shape[0]
        stored = self.assignments[idx.clamp_max(self.assignments.shape[0] - 1)]
        known = known & (stored >= 0).all(dim=1)
        return torch.where(known[:, None], stored, nearest)

    def forward(self, views: Views, batch: Batch) -> Loss:
        losses = []
        shared = resolve_gather(self.gather)
        for z in views.embeddings:
            cos = self.cosines(z)
            pos = self.positives(cos, batch)
            keep = sample_classes(gather_no_grad(pos) if shared else pos, self.n_clusters,
                                  self.negative_ratio, shared=shared)
            losses.append(multilabel_cluster_loss(cos, pos, scale=self.scale, margin=self.margin,
                                                  class_mask=keep))
        per_sample = torch.stack(losses).mean(0)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"sampled_classes": keep.sum().detach().float()})

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        key = prefix + "centres"
        if isinstance(self.centres, nn.UninitializedParameter) and key in state_dict:
            self.centres.materialize(state_dict[key].shape, device=state_dict[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


CARD = Card(
    name="multilabel_cluster_discrimination", kind="objective",
    title="Multi-label Cluster Discrimination for Visual Representation Learning",
    paper="arXiv:2407.17331",
    summary="Offline spherical k-means gives K centres; each sample's l nearest centres are its "
            "labels; a multi-label loss with separate positive and negative log-sum-exp terms "
            "(shared threshold 0) trains the embedding and a learnable centre bank, with negative "
            "classes sampled PartialFC-style.",
    formula="c_j = cos(f(x), w_j); L = log(1 + sum_{i in Omega_p} e^{-s(c_i - m)}) + "
            "log(1 + sum_{j in Omega_n} e^{s(c_j + m)}); Omega_p = l nearest k-means centres; "
            "Omega_n = the other classes among a sample of max(ceil(r K), #batch positives) that "
            "keeps every batch positive; defaults s=32, m=0, l=3, r=0.1",
    left_out="The LAION-400M scale (one million centres), the CLIP features used for the offline "
             "clustering (the model's own embeddings are clustered here), the ViT backbone and its "
             "text tower for zero-shot evaluation, distributed PartialFC sharding. Defaults follow "
             "the catalogue for small data (l=3, s=32, r=0.1, margin 0); the paper's LAION values "
             "could not be checked against its full text here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MultilabelClusterDiscrimination, card=CARD)
