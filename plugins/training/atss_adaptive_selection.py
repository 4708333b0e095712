"""Adaptive training sample selection (ATSS): for every target, take the ``k`` candidates closest
to it on each level, and keep as positives those whose score (IoU in detection) reaches the
mean plus the standard deviation of the candidates' scores, so the threshold adapts to each
target's statistics.

Zhang, Chi, Yao, Lei & Li, "Bridging the Gap Between Anchor-based and Anchor-free Detection via
Adaptive Training Sample Selection", CVPR 2020 (arXiv:1912.02424), Algorithm 1; checked against
the authors' code (github.com/sfzhang15/ATSS, ``ATSSLossComputation.prepare_targets``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.types import Batch, Pairs, Views

OWNER = "atss_adaptive_selection"


def atss_select(scores: Tensor, distances: Tensor, level_sizes: Sequence[int], k: int = 9, *,
                valid: Tensor | None = None, unique: bool = True) -> Tensor:
    """Boolean ``[G, A]`` positives of ``G`` targets among ``A`` candidates laid out in
    contiguous levels of ``level_sizes`` (summing to ``A``):

    * ``C_g``: on each level ``l``, the ``min(k, |l|)`` candidates of smallest ``distances[g]``,
      less those at infinite distance (not candidates of ``g`` at all);
    * ``t_g = mean(S_g) + std(S_g)`` over ``S_g = scores[g, C_g]`` (unbiased std, as the
      authors' ``Tensor.std``; 0 when ``|C_g| = 1``; no positive when ``C_g`` is empty);
    * positive ``[g, a] = a in C_g and scores[g, a] >= t_g and valid[g, a]`` (ATSS: the anchor's
      centre lies inside the box);
    * ``unique``: a candidate positive for several targets stays positive for the one of highest
      score only (the first on ties)."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ShapeError(f"{OWNER}: scores must be floating [G, A], got {scores.dtype} "
                         f"{list(scores.shape)}")
    if distances.shape != scores.shape:
        raise ShapeError(f"{OWNER}: distances {list(distances.shape)} must match scores "
                         f"{list(scores.shape)}")
    if valid is not None and (valid.shape != scores.shape or valid.dtype != torch.bool):
        raise ShapeError(f"{OWNER}: valid must be bool {list(scores.shape)}, got {valid.dtype} "
                         f"{list(valid.shape)}")
    sizes = list(level_sizes)
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != scores.shape[1]:
        raise ShapeError(f"{OWNER}: level_sizes {sizes} must be positive and sum to the "
                         f"{scores.shape[1]} candidates")
    picks, start = [], 0
    for size in sizes:  # a few levels; every target at once
        idx = distances[:, start:start + size].topk(min(k, size), dim=1, largest=False).indices
        picks.append(idx + start)
        start += size
    cand = torch.cat(picks, dim=1)
    real = distances.gather(1, cand) < float("inf")
    s = scores.gather(1, cand).masked_fill(~real, 0)
    count = real.sum(1, keepdim=True)
    mean = s.sum(1, keepdim=True) / count.clamp_min(1)
    var = ((s - mean) ** 2 * real).sum(1, keepdim=True) / (count - 1).clamp_min(1)
    keep = real & (s >= mean + var.sqrt())
    if valid is not None:
        keep = keep & valid.gather(1, cand)
    positive = torch.zeros_like(scores, dtype=torch.bool).scatter(1, cand, keep)
    if unique:
        masked = scores.masked_fill(~positive, float("-inf"))
        best = F.one_hot(masked.argmax(0), scores.shape[0]).T.bool()
        positive = positive & best
    return positive


class ATSSAdaptiveSelection(Sampler):
    """ATSS's rule as a pair sampler over ``torch.cat(views.embeddings)`` (view-major rows): each
    row is a target, every other row a candidate, the views are the levels (``k`` candidates from
    each view), the score is the cosine similarity and the distance ``1 - cos``. Positives are
    :func:`atss_select`'s, plus (``with_views``) the other views of the row's own sample, so every
    anchor keeps its augmented pair; negatives are all other rows. A row is never its own
    candidate. Use with an objective that takes a sampler, e.g. ``nt_xent(sampler=...)``."""

    produces = frozenset({Input.PAIRS})

    def __init__(self, k: Annotated[int, Ge(1)] = 9, unique: bool = False,
                 with_views: bool = True):
        super().__init__()
        self.k, self.unique, self.with_views = k, unique, with_views

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        n_views, b = views.n_views, views.batch_size
        if n_views * b < 2:
            raise ShapeError(f"sampler {OWNER!r}: needs at least 2 rows over the views, got "
                             f"{n_views} view(s) of {b} sample(s)")
        z = F.normalize(torch.cat(views.embeddings).detach().float(), dim=1)
        sim = z @ z.T
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        dist = (1 - sim).masked_fill(eye, float("inf"))  # never its own candidate
        positive = atss_select(sim, dist, [b] * n_views, self.k, unique=self.unique)
        if self.with_views:
            sample = torch.arange(b, device=sim.device).repeat(n_views)
            positive = positive | ((sample[:, None] == sample[None, :]) & ~eye)
        return Pairs(positive=positive, negative=~positive & ~eye)


CARD = Card(
    name=OWNER, kind="sampler",
    title="Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive Training "
          "Sample Selection",
    paper="arXiv:1912.02424",
    summary="ATSS's adaptive positive selection: per target, the k nearest candidates of each "
            "level; positives are those scoring at least the mean plus the standard deviation "
            "of the candidates' scores. Here over embeddings: views are the levels, cosine "
            "similarity the score.",
    formula="C_g = union over levels l of the min(k, |l|) candidates nearest g (k = 9); t_g = "
            "mean(s_gC) + std(s_gC) (unbiased); pos_ga = [a in C_g] [s_ga >= t_g] [valid_ga]; "
            "unique: a candidate positive for several targets keeps the highest-scoring one; "
            "sampler: s = cos(z_r, z_c), distance 1 - s (infinite for c = r: no self candidate), "
            "levels = views, plus "
            "the row's own other views (with_views)",
    left_out="The detector: anchors, FPN levels, box IoU, the centre-in-box test and the "
             "classification/regression/centerness heads (atss_select takes any scores, "
             "distances, level sizes and validity mask, so boxes can be given). In the sampler "
             "the paper's one-target-per-anchor rule (unique, highest IoU wins) is off by "
             "default, since a contrastive candidate may serve several anchors, and the "
             "same-sample views are added as positives (with_views): both are our choices.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ATSSAdaptiveSelection, card=CARD)
