"""G-SimCLR's batching: no two samples of one batch share a k-means pseudo-label.

Chakraborty, Gosthipaty & Paul, "G-SimCLR: Self-Supervised Contrastive Learning with Guided
Projection via Pseudo Labelling", ICDM Workshops 2020 (arXiv:2009.12007).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from sdk import distributed
from sdk.card import Card
from sdk.cluster import kmeans
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl


def _capacity(counts: Tensor, batch_size: int) -> tuple[int, int]:
    """Largest per-cluster count ``cap`` that ``m = ceil(kept / B)`` batches (only the last one
    partial, of size ``last``) can hold one per batch, and the number ``kept`` it keeps: a
    cluster of ``m`` members needs one in every batch, so at most ``last`` clusters may have
    ``m``; clusters of fewer than ``m`` always fit."""
    cap = max(1, min(int(counts.max()), math.ceil(int(counts.sum()) / batch_size)))
    while True:
        kept = int(counts.clamp(max=cap).sum())
        n_batches = math.ceil(kept / batch_size)
        last = kept - (n_batches - 1) * batch_size
        if cap < n_batches or cap == n_batches and int((counts >= cap).sum()) <= last:
            return cap, kept
        cap -= 1


def pseudo_label_batches(labels: Tensor, batch_size: int, *,
                         generator: torch.Generator | None = None) -> list[Tensor]:
    """Batches of dataset positions in which every pseudo-label occurs at most once.

    Positions are shuffled within their cluster; clusters are sorted by size (largest first,
    ties in random order) and the list is dealt row by row into ``m = ceil(kept / B)``
    batches (only the last partial): position ``p`` goes to batch ``p mod`` (row width), so a
    run of one cluster (at most ``m`` long, and exactly one full row when it is ``m`` long)
    lands in distinct batches. When a cluster has more members than fit (:func:`_capacity`),
    its surplus (random members) sits this epoch out; otherwise every position appears exactly
    once. Full batches come in random order, the partial one last.
    """
    if labels.dim() != 1:
        raise ShapeError(f"pseudo_label_batches: expected labels [N], got {list(labels.shape)}")
    labels = labels.long().cpu()
    n = labels.shape[0]
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k)
    cap, kept = _capacity(counts, batch_size)
    perm = torch.randperm(n, generator=generator)
    tie = torch.randperm(k, generator=generator)
    cluster_rank = torch.argsort(torch.argsort(-counts.clamp(max=cap) * k + tie))
    keys, by_key = torch.sort(cluster_rank[labels[perm]], stable=True)
    order = perm[by_key]
    per_key = torch.bincount(keys, minlength=k)
    rank_in_cluster = torch.arange(n) - (torch.cumsum(per_key, 0) - per_key)[keys]
    order = order[rank_in_cluster < cap]  # the surplus of oversized clusters sits out
    n_batches = math.ceil(kept / batch_size)
    last = kept - (n_batches - 1) * batch_size
    grid = torch.ones(batch_size, n_batches, dtype=torch.bool)
    grid[last:, -1] = False  # the partial last batch has fewer slots
    slots = torch.full((batch_size, n_batches), -1, dtype=torch.long)
    slots[grid] = order  # row-major: consecutive positions go to consecutive batches
    batches = [col[col >= 0] for col in slots.T]
    full = torch.randperm(n_batches - (1 if last < batch_size else 0), generator=generator)
    return [batches[int(j)] for j in full] + batches[len(full):]


class PseudoLabelBatchSampler(torch.utils.data.Sampler[int]):
    """A data-level sampler (``Trainer(sampler=...)``, used with the loader's ``batch_size``)
    whose consecutive chunks of ``batch_size`` positions carry distinct pseudo-labels.

    At every epoch start the training set is embedded (``trainer.embed``; ``features=True``:
    the backbone's features, as G-SimCLR clusters an encoder's latent space) and clustered
    into ``n_clusters`` groups by seeded k-means (on L2-normalised rows when ``normalize``);
    the epoch's order then comes from :func:`pseudo_label_batches` with a generator seeded by
    ``seed + epoch``. ``n_clusters`` None means ``batch_size`` (as the reference code does:
    64 clusters for batches of 64; the fewest clusters that can fill a batch). ``num_samples``
    is the training set's size (default: CIFAR-10's 50000); a Trainer sets it from its training
    set through :meth:`bind`. Pseudo-labels and epoch are checkpointed, so a resumed epoch replays its order.
    Under DDP every rank takes every ``world``-th full batch (the partial one and any remainder
    are left out).
    """

    shards_ranks = True  # the Trainer leaves the per-rank split of whole batches to it

    def __init__(self, num_samples: int = 50000, batch_size: int = 64, n_clusters: int | None = None,
                 features: bool = False, normalize: bool = True, kmeans_iters: int = 50,
                 seed: int = 0):
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                            ("kmeans_iters", kmeans_iters)):
            if value < 1:
                raise ConfigError(f"pseudo_label_batch_sampler: {name} must be >= 1, got {value}",
                                  param=name)
        k = batch_size if n_clusters is None else n_clusters
        if not batch_size <= k <= num_samples:
            raise ConfigError(f"pseudo_label_batch_sampler: n_clusters must be in [batch_size="
                              f"{batch_size}, num_samples={num_samples}] so that a batch of distinct "
                              f"pseudo-labels can be filled, got {k}", param="n_clusters")
        self.num_samples, self.batch_size, self.n_clusters = num_samples, batch_size, k
        self.features, self.normalize, self.kmeans_iters, self.seed = (features, normalize,
                                                                       kmeans_iters, seed)
        self.epoch = 0
        self.labels: Tensor | None = None

    def bind(self, dataset: Any) -> None:
        """``num_samples <- len(dataset)``: the Trainer calls it with the training set."""
        n = len(dataset)
        if not self.n_clusters <= n:
            raise ConfigError(f"pseudo_label_batch_sampler: n_clusters={self.n_clusters} exceeds "
                              f"the training set ({n} samples)", param="n_clusters")
        self.num_samples = n

    # pseudo-labels -------------------------------------------------------------------------
    def refresh(self, embeddings: Tensor) -> None:
        """Pseudo-labels <- k-means of ``embeddings`` [num_samples, D] (dataset order)."""
        if embeddings.dim() != 2 or embeddings.shape[0] != self.num_samples:
            raise ShapeError(f"pseudo_label_batch_sampler: expected embeddings [{self.num_samples}, "
                             f"D] in dataset order, got {list(embeddings.shape)}")
        labels, _ = kmeans(embeddings, self.n_clusters, iters=self.kmeans_iters,
                           seed=self.seed + self.epoch, normalize=self.normalize)
        self.labels = labels.cpu()

    def on_epoch_start(self, trainer: Any) -> None:
        loader = trainer.train_loader
        size = getattr(loader, "batch_size", None)
        if size != self.batch_size:
            raise ConfigError(f"pseudo_label_batch_sampler: batch_size={self.batch_size} but the "
                              f"training loader's batch_size is {size}; they must agree",
                              param="batch_size")
        self.refresh(trainer.embed(loader, features=self.features))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # sampling ------------------------------------------------------------------------------
    def batches(self) -> list[Tensor]:
        """This rank's batches for the current epoch (a random order before any refresh)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.labels is None:
            order = torch.randperm(self.num_samples, generator=g)
            out = list(order.split(self.batch_size))
        else:
            out = pseudo_label_batches(self.labels, self.batch_size, generator=g)
        world = distributed.world_size()
        if world > 1:
            full = [b for b in out if b.numel() == self.batch_size]
            out = full[: len(full) - len(full) % world][distributed.rank()::world]
        return out

    def __iter__(self) -> Iterator[int]:
        batches = self.batches()
        return iter(torch.cat(batches).tolist() if batches else [])

    def __len__(self) -> int:
        return sum(b.numel() for b in self.batches())

    # state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "labels": self.labels}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        labels = state.get("labels")
        if labels is not None and labels.shape != (self.num_samples,):
            raise ShapeError(f"pseudo_label_batch_sampler: checkpointed labels have shape "
                             f"{list(labels.shape)}, expected [{self.num_samples}]")
        self.epoch = int(state.get("epoch", 0))
        self.labels = None if labels is None else labels.clone()


CARD = Card(
    name="pseudo_label_batch_sampler", kind="sampler",
    title="G-SimCLR: Self-Supervised Contrastive Learning with Guided Projection via Pseudo "
          "Labelling",
    paper="arXiv:2009.12007",
    summary="Each epoch, k-means pseudo-labels of the current embeddings; batches are formed so "
            "that no two samples of a batch share a pseudo-label, which keeps likely same-class "
            "samples out of each other's NT-Xent negatives.",
    formula="c = kmeans_K(embed(X)); batches B_1..B_m partition the kept positions with "
            "c(i) != c(j) for all i != j in one B_t; m = ceil(kept / B), a cluster keeps at most "
            "as many members as rows of the layout allow (all of them when |c^-1(k)| <= m)",
    left_out="Defaults follow the reference CIFAR-10 code (K = batch size = 64, 50000 samples). "
             "The paper's denoising autoencoder (the pseudo-labels come from the encoder being "
             "trained, or its backbone features with features=True, refreshed every epoch rather "
             "than fixed once), and its CIFAR-10 / ImageNet-subset setups. K must be >= the batch "
             "size; surplus members of clusters larger than the number of batches skip the epoch.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add("sampler", "pseudo_label_batch_sampler", PseudoLabelBatchSampler, card=CARD)
