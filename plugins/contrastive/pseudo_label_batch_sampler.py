"""G-SimCLR's batching: samples of one k-means pseudo-label go to different batches.

Chakraborty, Gosthipaty & Paul, "G-SimCLR: Self-Supervised Contrastive Learning with Guided
Projection via Pseudo Labelling", ICDM Workshops 2020 (arXiv:2009.12007).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import Tensor

from sdk import distributed
from sdk.card import Card
from sdk.cluster import kmeans
from sdk.errors import ConfigError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import DataSampler


def pseudo_label_batches(labels: Tensor, batch_size: int, *,
                         generator: torch.Generator | None = None) -> list[Tensor]:
    """Batches of all dataset positions (each exactly once) with the fewest possible pairs of
    samples that share a pseudo-label inside one batch.

    With ``w = floor(N / B)`` full batches and a partial one of ``r = N mod B`` positions, the
    partial batch takes ``y_k`` members of cluster ``k`` and the rest are dealt evenly over the
    full batches. The pair count of cluster ``k`` is then ``C(y_k, 2) + g(n_k - y_k)``, where
    ``g(n)`` counts the pairs of ``n`` members spread as evenly as possible over ``w`` batches, so
    the ``y_k`` come from a greedy pick of the ``r`` cheapest marginal moves
    ``(y - 1) - floor((n_k - y) / w)`` (optimal: every ``y -> cost`` is convex). The even spread:
    clusters (members shuffled, clusters in random order) are concatenated and dealt row by row
    into a ``[B, w]`` grid, so a run of ``n`` members of one cluster puts ``floor(n / w)`` or
    ``ceil(n / w)`` into each batch. The total is the minimum over all partitions into batches
    of these sizes; it is zero whenever every cluster has at most ``w`` members (or at most
    ``w + 1``, for no more than ``r`` clusters). Full batches come in random order, the partial
    one last.
    """
    if labels.dim() != 1:
        raise ShapeError(f"pseudo_label_batches: expected labels [N], got {list(labels.shape)}")
    labels = labels.long().cpu()
    n = labels.shape[0]
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k)
    w, r = divmod(n, batch_size)
    perm = torch.randperm(n, generator=generator)
    tie = torch.randperm(k, generator=generator)  # random cluster order, random greedy ties
    keys, by_key = torch.sort(tie[labels[perm]], stable=True)
    order = perm[by_key]  # grouped by cluster, members shuffled
    per_key = torch.bincount(keys, minlength=k)
    rank_in_cluster = torch.arange(n) - (torch.cumsum(per_key, 0) - per_key)[keys]
    if w == 0:
        take = counts  # a single, partial batch
    elif r == 0:
        take = torch.zeros_like(counts)
    else:
        y = torch.arange(1, r + 1)
        marginal = (y - 1) - torch.div(counts[:, None] - y, w, rounding_mode="floor")
        marginal = marginal.masked_fill(y > counts[:, None], n)  # [K, r]; rising in y
        key = (marginal + n) * k + tie[:, None]  # distinct keys: ties between clusters at random
        pick = torch.argsort(key.flatten())[:r] // r
        take = torch.bincount(pick, minlength=k)
    partial = rank_in_cluster < take[labels[order]]
    rest = order[~partial].view(batch_size, w)  # row-major: a cluster's run spreads evenly
    batches = [rest[:, int(j)] for j in torch.randperm(w, generator=generator)]
    return batches + ([order[partial]] if r else [])


class PseudoLabelBatchSampler(DataSampler):
    """A data-level sampler (``Trainer(sampler=...)``, used with the loader's ``batch_size``)
    that yields every training position once per epoch, in consecutive chunks of ``batch_size``
    that repeat a pseudo-label only as often as the cluster sizes force (never, when no cluster
    has more members than there are full batches).

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

    def __init__(self, num_samples: Annotated[int, Ge(1)] = 50000,
                 batch_size: Annotated[int, Ge(1)] = 64, n_clusters: int | None = None,
                 features: bool = False, normalize: bool = True,
                 kmeans_iters: Annotated[int, Ge(1)] = 50, seed: int = 0):
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

    def on_epoch_start(self, state: State) -> None:
        loader = state.trainer.train_loader
        size = getattr(loader, "batch_size", None)
        if size != self.batch_size:
            raise ConfigError(f"pseudo_label_batch_sampler: batch_size={self.batch_size} but the "
                              f"training loader's batch_size is {size}; they must agree",
                              param="batch_size")
        self.refresh(state.trainer.embed(loader, features=self.features))

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
    formula="c = kmeans_K(embed(X)); batches B_1..B_m (m = ceil(N / B), sizes B and the "
            "remainder last) partition all N positions and minimise sum_t #{i<j in B_t: c(i) = c(j)}: "
            "the last batch takes y_k of cluster k (greedy on the marginal cost "
            "(y-1) - floor((n_k - y) / w), w = floor(N / B)), the rest are spread evenly over the w "
            "full batches; zero shared labels whenever every n_k <= w",
    left_out="Defaults follow the reference CIFAR-10 code (K = batch size = 64, 50000 samples). "
             "The paper's denoising autoencoder (the pseudo-labels come from the encoder being "
             "trained, or its backbone features with features=True, refreshed every epoch rather "
             "than fixed once), and its CIFAR-10 / ImageNet-subset setups. K must be >= the batch "
             "size. Every sample is used every epoch, so a cluster larger than the number of "
             "batches shares some batches with itself (as few pairs as possible) instead of "
             "leaving members out; under DDP the partial batch and the remainder of full batches "
             "that does not divide by the world size are left out of the epoch.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PseudoLabelBatchSampler, card=CARD)
