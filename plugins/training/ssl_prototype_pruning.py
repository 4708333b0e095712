"""Self-supervised prototype pruning: cluster the (self-supervised) embeddings of the training set
with k-means, score every sample by its cosine distance to its cluster's centroid (its
prototype), and train on a fraction of the data: the hardest (least prototypical) samples when
data is abundant, the easiest when it is scarce.

Sorscher, Geirhos, Shekhar, Ganguli & Morcos, "Beyond neural scaling laws: beating power law
scaling via data pruning", NeurIPS 2022 (arXiv:2206.14486), Sec. 6 (the self-supervised
prototype metric) and Sec. 2 (keep hard examples with abundant data, easy ones with scarce).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor

from sdk.card import Card
from sdk.cluster import kmeans
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, NotFittedError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import DataSampler

OWNER = "ssl_prototype_pruning"


def prototype_scores(embeddings: Tensor, n_clusters: int, *, iters: int = 50,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(scores [N], labels [N])``: with ``z`` the L2-normalised rows of ``embeddings`` ``[N, D]``
    and ``c, a = kmeans_K(z)`` (seeded, :func:`sdk.cluster.kmeans`), ``s_i = 1 - cos(z_i,
    c_{a(i)})``, the cosine distance to the sample's prototype (higher = harder)."""
    if embeddings.dim() != 2 or not embeddings.is_floating_point() or embeddings.shape[0] == 0:
        raise ShapeError(f"{OWNER}: embeddings must be floating [N, D] with N >= 1, got "
                         f"{embeddings.dtype} {list(embeddings.shape)}")
    if not 1 <= n_clusters <= embeddings.shape[0]:
        raise ConfigError(f"{OWNER}: n_clusters must be in [1, N={embeddings.shape[0]}], got "
                          f"{n_clusters}", param="n_clusters")
    if not bool(torch.isfinite(embeddings).all()):  # offline, once per run: the check may sync
        raise ShapeError(f"{OWNER}: embeddings hold NaN or inf (a diverged encoder?)")
    z = F.normalize(embeddings.detach().float(), dim=1)
    labels, centres = kmeans(z, n_clusters, iters=iters, seed=seed)
    scores = 1 - (z * F.normalize(centres, dim=1)[labels]).sum(1)
    return scores, labels


def kept_positions(scores: Tensor, keep_fraction: float, keep: str) -> Tensor:
    """The ``max(1, round(keep_fraction N))`` positions with the largest scores (``keep="hard"``)
    or the smallest (``"easy"``), ascending; ties go to the lower position."""
    n = scores.shape[0]
    m = max(1, round(keep_fraction * n))
    order = torch.sort(scores, stable=True, descending=keep == "hard").indices
    return order[:m].sort().values


class SSLPrototypePruning(DataSampler):
    """A data-level sampler (``Trainer(sampler=...)``) that yields, every epoch, a seeded
    permutation (``seed + epoch``) of the kept training positions only (:func:`kept_positions`
    of :func:`prototype_scores`).

    The embeddings are given by :meth:`fit` (e.g. a pretrained self-supervised encoder's), or,
    when it was not called, taken at fit start from the Trainer's encoder (``trainer.embed`` of
    the training set; ``features=True``: its backbone features), once: the pruned set is fixed
    for the run, as in the paper. ``n_clusters`` defaults to the number of classes (the paper
    finds the metric robust to ``k`` within an order of magnitude of it). Scores, the kept
    positions and the epoch are checkpointed; under DDP the Trainer gives each rank every
    ``world``-th position of the order.
    """

    def __init__(self, keep_fraction: Annotated[float, Interval(gt=0, le=1)] = 0.8,
                 keep: Annotated[str, one_of(("hard", "easy"))] = "hard",
                 n_clusters: Annotated[int, Ge(1), FromData("num_classes")] = 10,
                 features: bool = False, kmeans_iters: Annotated[int, Ge(1)] = 50, seed: int = 0):
        self.keep_fraction, self.keep, self.n_clusters = keep_fraction, keep, n_clusters
        self.features, self.kmeans_iters, self.seed = features, kmeans_iters, seed
        self.epoch = 0
        self.num_samples: int | None = None
        self.scores: Tensor | None = None
        self.kept: Tensor | None = None

    def bind(self, dataset: Any) -> None:
        """Told the training set: its size must match fitted scores."""
        n = len(dataset)
        if self.scores is not None and self.scores.shape[0] != n:
            raise ShapeError(f"{OWNER}: fitted on {self.scores.shape[0]} embeddings, but the "
                             f"training set has {n} items")
        self.num_samples = n

    def fit(self, embeddings: Tensor) -> SSLPrototypePruning:
        """Score ``embeddings`` ``[N, D]`` (one row per training item, dataset order) and keep
        the fraction; returns ``self``."""
        if self.num_samples is not None and embeddings.shape[0] != self.num_samples:
            raise ShapeError(f"{OWNER}: expected embeddings [{self.num_samples}, D] in dataset "
                             f"order, got {list(embeddings.shape)}")
        scores, _ = prototype_scores(embeddings, self.n_clusters, iters=self.kmeans_iters,
                                     seed=self.seed)
        self.scores = scores.cpu()
        self.kept = kept_positions(self.scores, self.keep_fraction, self.keep)
        return self

    def on_fit_start(self, state: State) -> None:
        if self.kept is None:
            trainer = state.trainer
            self.fit(trainer.embed(trainer.train_loader, features=self.features))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.kept is None:
            raise NotFittedError(f"{OWNER}: no scores yet; call fit(embeddings) or use it in a "
                                 "Trainer (it embeds the training set at fit start)")
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.kept[torch.randperm(self.kept.shape[0], generator=g)].tolist())

    def __len__(self) -> int:
        if self.kept is not None:
            return self.kept.shape[0]
        return max(1, round(self.keep_fraction * self.num_samples)) if self.num_samples else 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "scores": self.scores, "kept": self.kept}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        scores, kept = state.get("scores"), state.get("kept")
        if scores is not None and self.num_samples is not None and scores.shape[0] != self.num_samples:
            raise ShapeError(f"{OWNER}: the checkpointed state scores {scores.shape[0]} samples, but "
                             f"the training set has num_samples={self.num_samples}")
        self.epoch = int(state.get("epoch", 0))
        self.scores = None if scores is None else scores.clone()
        self.kept = None if kept is None else kept.clone()


CARD = Card(
    name="ssl_prototype_pruning", kind="sampler",
    title="Beyond neural scaling laws: beating power law scaling via data pruning",
    paper="arXiv:2206.14486",
    summary="Data pruning with the self-supervised prototype metric: k-means of the normalised "
            "embeddings, score = cosine distance to the sample's centroid; the sampler trains on "
            "the hardest fraction (abundant data) or the easiest (scarce data).",
    formula="z_i = e_i / ||e_i||; (a, c) = kmeans_K(z); s_i = 1 - cos(z_i, c_{a(i)}); kept = the "
            "round(f N) largest s (keep='hard') or smallest (keep='easy'); each epoch a seeded "
            "permutation of the kept positions",
    left_out="The SwAV ImageNet encoder (any embeddings can be given to fit, else the Trainer's "
             "encoder at fit start) and the paper's other pruning metrics (EL2N, forgetting, "
             "memorisation) and its perceptron theory. keep_fraction = 0.8 and K = number of "
             "classes are our defaults (the paper sweeps the fraction and finds K robust within an "
             "order of magnitude); keep='hard' is the paper's abundant-data regime. Pruning is "
             "global over the scores, with no per-cluster or per-class quota.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SSLPrototypePruning, card=CARD)
