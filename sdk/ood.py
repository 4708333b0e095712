"""Out-of-distribution detection: what the detectors of ``plugins/uncertainty/`` share.

Score convention
    Every detector's ``score(x)`` is an **anomaly score**: higher = more anomalous (more likely
    out-of-distribution). Papers that report a confidence (maximum softmax probability, negative
    energy, ViM's ``energy - alpha * residual``) are negated, so one threshold direction and the
    OOD metrics of :mod:`sdk.metrics` (``auroc``, ``aupr_in``, ``aupr_out``, ``fpr_at_tpr``)
    apply to all of them.

Streaming statistics
    :class:`ClassMoments` holds per-class counts and means and the shared within-class scatter
    ``W = sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T`` in float64, updated batch by batch
    with the pairwise formula of Chan, Golub and LeVeque (1979), never the raw sums of squares
    (which cancel catastrophically when ``|mu| >> sigma``). Memory is ``C x D + D x D`` whatever
    the number of rows: 1000 classes x 1024 features take 16 MiB. Two partial statistics merge
    exactly (:meth:`ClassMoments.merge_`), so ranks that each saw a shard combine with
    :meth:`ClassMoments.reduced`.

Feature banks
    :class:`FeatureBank` keeps in-distribution rows (L2-normalised when asked) for detectors
    that need the rows themselves: the k-th neighbour distance of kNN, ViM's mean residual,
    the Euclidean neighbours of :func:`nearest_rows` and the mean-shift of :func:`mean_shift`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from sdk.errors import ShapeError
from sdk.state import ResizableBuffers

_STAT = torch.float64

__all__ = ["ClassMoments", "FeatureBank", "max_softmax", "energy", "kth_neighbour_distance",
           "nearest_rows", "mean_shift"]


def max_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``max_c softmax(z / T)_c`` in float32 (Hendrycks and Gimpel 2017; ODIN's ``S``)."""
    return (logits.float() / temperature).softmax(-1).amax(-1)


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The free energy ``E(z) = -T logsumexp(z / T)`` in float32 (Liu et al. 2020); higher for
    out-of-distribution inputs."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


class ClassMoments(ResizableBuffers, nn.Module):
    """Per-class counts ``[C]``, means ``[C, D]`` and the shared within-class scatter ``[D, D]``,
    float64, accumulated batch by batch (Chan et al.'s pairwise merge). The number of classes
    grows with the largest label seen; ``labels=None`` puts every row in class 0."""

    resizable_buffers: ClassVar[tuple[str, ...]] = ("counts", "means", "scatter")

    def __init__(self, owner: str) -> None:
        super().__init__()
        self.owner = owner
        self.register_buffer("counts", torch.zeros(0, dtype=_STAT))
        self.register_buffer("means", torch.zeros(0, 0, dtype=_STAT))
        self.register_buffer("scatter", torch.zeros(0, 0, dtype=_STAT))

    @property
    def total(self) -> Tensor:
        return self.counts.sum()

    def update(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Add the rows ``x`` ``[N, D]`` of classes ``labels`` ``[N]`` (reads the largest label:
        one host sync per batch, fitting being offline)."""
        x = x.detach().to(_STAT)
        if labels is None:
            labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if x.shape[0] == 0:
            return
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0:
            raise ShapeError(f"{self.owner}: labels must be class ids >= 0, got {low}")
        classes = max(high + 1, self.counts.shape[0])
        counts = torch.bincount(labels, minlength=classes).to(_STAT)
        sums = x.new_zeros(classes, x.shape[1]).index_add_(0, labels, x)
        means = sums / counts.clamp_min(1)[:, None]
        centred = x - means[labels]
        self.merge_(counts, means, centred.T @ centred)

    def merge_(self, counts: Tensor, means: Tensor, scatter: Tensor) -> None:
        """Merge another partial statistic in place (Chan et al. 1979): with ``n = n_a + n_b``
        and ``d = mu_b - mu_a`` per class, ``mu = mu_a + d n_b / n`` and
        ``W = W_a + W_b + sum_c (n_a n_b / n)_c d_c d_c^T``."""
        if self.counts.numel() == 0:
            self.counts, self.means, self.scatter = counts.clone(), means.clone(), scatter.clone()
            return
        if scatter.shape != self.scatter.shape:
            raise ShapeError(f"{self.owner}: statistics of width {scatter.shape[0]} cannot join "
                             f"those of width {self.scatter.shape[0]}")
        classes = max(counts.shape[0], self.counts.shape[0])
        n_a, mu_a = _pad(self.counts, classes), _pad(self.means, classes)
        n_b, mu_b = _pad(counts.to(n_a), classes), _pad(means.to(mu_a), classes)
        n = n_a + n_b
        delta = mu_b - mu_a
        share = (n_b / n.clamp_min(1))[:, None]
        weight = (n_a * n_b / n.clamp_min(1))[:, None]
        self.scatter = self.scatter + scatter.to(self.scatter) + (delta * weight).T @ delta
        self.means = mu_a + delta * share
        self.counts = n

    def reduced(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts, means, scatter)`` of every rank's statistics merged in rank order, the same
        on all ranks (this rank's own when not distributed); the statistics themselves stay
        this rank's, so updating and reducing again never counts a row twice."""
        from sdk import distributed

        parts = distributed.all_gather_object((self.counts.cpu(), self.means.cpu(), self.scatter.cpu()))
        if len(parts) == 1:
            return self.counts, self.means, self.scatter
        total = ClassMoments(self.owner).to(self.counts.device)
        for counts, means, scatter in parts:
            if counts.numel():
                total.merge_(*(t.to(self.counts.device) for t in (counts, means, scatter)))
        return total.counts, total.means, total.scatter

    def covariance(self) -> Tensor:
        """The shared (pooled, maximum-likelihood) covariance ``W / N`` of this rank's rows."""
        return self.scatter / self.total.clamp_min(1)


def _pad(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class FeatureBank(ResizableBuffers, nn.Module):
    """In-distribution rows ``[N, D]`` (float32), L2-normalised when ``normalize``."""

    resizable_buffers: ClassVar[tuple[str, ...]] = ("rows",)

    def __init__(self, normalize: bool) -> None:
        super().__init__()
        self.normalize = normalize
        self.register_buffer("rows", torch.zeros(0, 0))

    def add(self, x: Tensor) -> None:
        x = x.detach().float()
        if self.normalize:
            x = nn.functional.normalize(x, dim=1)
        self.rows = x.clone() if self.rows.numel() == 0 else torch.cat([self.rows, x.to(self.rows)])


def kth_neighbour_distance(bank: Tensor, queries: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Euclidean distance from each query row to its ``k``-th nearest bank row, for
    L2-normalised rows (``||a - b|| = sqrt(2 - 2 a.b)``), ``chunk_size`` queries at a time;
    ``k`` is capped at the bank's size."""
    k = min(k, bank.shape[0])
    out = []
    for lo in range(0, queries.shape[0], chunk_size):
        sim = queries[lo:lo + chunk_size] @ bank.T
        kth = sim.topk(k, dim=1).values[:, -1]
        out.append((2 - 2 * kth).clamp_min(0).sqrt())
    return torch.cat(out) if out else queries.new_zeros(0)


def nearest_rows(bank: Tensor, queries: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Indices ``[N, k]`` of each query row's ``k`` nearest bank rows in Euclidean distance
    (nearest first; a query that is a bank row finds itself), ``chunk_size`` queries at a time;
    ``k`` is capped at the bank's size."""
    k = min(k, bank.shape[0])
    out = [torch.cdist(queries[lo:lo + chunk_size], bank).topk(k, dim=1, largest=False).indices
           for lo in range(0, queries.shape[0], chunk_size)]
    return torch.cat(out) if out else queries.new_zeros(0, k, dtype=torch.long)


def mean_shift(bank: Tensor, x: Tensor, k: int, iterations: int, chunk_size: int = 1024) -> Tensor:
    """``iterations`` steps of ``x <- mean of the k nearest bank rows of x`` (the bank stays
    fixed); ``iterations = 0`` returns ``x``."""
    for _ in range(iterations):
        x = bank[nearest_rows(bank, x, k, chunk_size)].mean(1)
    return x
