"""GroCo: contrastive learning with group ordering constraints through a differentiable sort.

Shvetsova, Petersen, Kukleva, Schiele, Kuehne, "Learning by Sorting: Self-supervised Learning
with Group Ordering Constraints", ICCV 2023 (arXiv:2303.13912).

Per anchor, the similarities to its ``k`` most similar negatives and to its positives are
pre-ordered group-wise (negatives ascending, then positives ascending) and sorted by a relaxed
odd-even sorting network (Petersen et al., diffsort, Cauchy swap). The network's doubly
stochastic permutation matrix ``P[i, p]`` (input ``i`` lands at rank ``p``, ascending) gives the
probability that each input ends in the positive group (the top ``|P|`` ranks); the loss is
the binary cross-entropy of that group membership against the ideal order (every positive
ranked above every negative).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Sampler
from sdk.types import Batch, Loss, Views

_FILL = 4.0  # outside [-1, 1]: placeholder similarity of a missing candidate (anchor excluded)
_LOG_MIN = -100.0  # torch's BCE clamps log at -100


def odd_even_soft_sort(x: Tensor, steepness: float = 1.0) -> tuple[Tensor, Tensor]:
    """Relaxed odd-even transposition sort of each row of ``x`` [B, n] (ascending).

    Layer ``l`` compares wires ``(i, i+1)`` for ``i = l % 2, l % 2 + 2, ...``; a comparator
    with inputs ``a`` (lower wire) and ``b`` puts ``alpha a + (1 - alpha) b`` on the lower wire
    and ``(1 - alpha) a + alpha b`` on the upper one, ``alpha = atan(steepness (b - a)) / pi +
    1/2`` (Cauchy). Returns the relaxed sorted values [B, n] and ``P`` [B, n, n] with
    ``sorted = x @ P``; ``P`` tends to the hard permutation as ``steepness -> inf``.
    """
    if x.dim() != 2:
        raise ShapeError(f"odd_even_soft_sort: expected [B, n], got {list(x.shape)}")
    b, n = x.shape
    perm = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    for layer in range(n):
        lo = slice(layer % 2, n - 1, 2)
        hi = slice(layer % 2 + 1, n, 2)
        xa, xb = x[:, lo], x[:, hi]
        alpha = torch.atan(steepness * (xb - xa)) / math.pi + 0.5
        new_x = x.clone()
        new_x[:, lo] = alpha * xa + (1 - alpha) * xb
        new_x[:, hi] = (1 - alpha) * xa + alpha * xb
        pa, pb = perm[:, :, lo], perm[:, :, hi]
        w = alpha[:, None, :]
        new_perm = perm.clone()
        new_perm[:, :, lo] = w * pa + (1 - w) * pb
        new_perm[:, :, hi] = (1 - w) * pa + w * pb
        x, perm = new_x, new_perm
    return x, perm


def soft_rank(x: Tensor, steepness: float = 1.0) -> Tensor:
    """Expected ascending rank (0-based) of each entry of ``x`` [B, n] under the relaxed sort."""
    _, perm = odd_even_soft_sort(x, steepness)
    ranks = torch.arange(x.shape[1], dtype=perm.dtype, device=x.device)
    return perm @ ranks


def _bce(p: Tensor, target: Tensor) -> Tensor:
    return -(target * p.log().clamp_min(_LOG_MIN) + (1 - target) * (1 - p).log().clamp_min(_LOG_MIN))


def groco_sorting_loss(pos_sims: Tensor, neg_sims: Tensor, steepness: float = 1.0) -> Tensor:
    """Per-anchor GroCo loss from similarities to positives [A, P] and negatives [A, k].

    Inputs are pre-ordered (negatives ascending, then positives ascending), soft-sorted, and
    ``l = mean_i (BCE(p_pos(i), [i is positive]) + BCE(p_neg(i), [i is negative])) / 2`` with
    ``p_pos(i) = sum_{rank >= k} P[i, rank]`` and ``p_neg(i) = sum_{rank < k} P[i, rank]``.
    """
    k = neg_sims.shape[1]
    dtype = torch.promote_types(pos_sims.dtype, torch.float32)
    seq = torch.cat([neg_sims.to(dtype).sort(dim=1).values,
                     pos_sims.to(dtype).sort(dim=1).values], 1)
    _, perm = odd_even_soft_sort(seq, steepness)
    p_pos = perm[:, :, k:].sum(-1).clamp(0, 1)
    p_neg = perm[:, :, :k].sum(-1).clamp(0, 1)
    is_pos = (torch.arange(seq.shape[1], device=seq.device) >= k).to(seq.dtype).expand_as(p_pos)
    return ((_bce(p_pos, is_pos) + _bce(p_neg, 1 - is_pos)) / 2).mean(dim=1)


def groco_loss(z1: Tensor, z2: Tensor, *more_views: Tensor, steepness: float = 1.0,
               topk_negatives: int = 10, stop_gradient: bool = True,
               same_view_negatives: bool = True, sampler: Sampler | None = None,
               batch: Batch | None = None, gather: Gather = "auto") -> Tensor:
    """Mean GroCo loss over every anchor of every view; see :class:`GroCo`."""
    return GroCo(steepness=steepness, topk_negatives=topk_negatives, stop_gradient=stop_gradient,
                 same_view_negatives=same_view_negatives, sampler=sampler, gather=gather)(
        Views(embeddings=(z1, z2, *more_views)), batch).value


class GroCo(Objective):
    """Group ordering constraint loss over cosine similarities.

    For anchor row ``r`` (view ``v`` of sample ``i``): positives are the other ``V - 1`` views
    of sample ``i`` (with a Sampler: its ``V - 1`` least similar positives); negatives are the
    ``topk_negatives`` most similar negatives, taken from view ``v`` only when
    ``same_view_negatives`` (as the reference code does) or from every view. With
    ``stop_gradient`` the positives' and negatives' embeddings are detached, so each row
    receives gradient only as an anchor. When a batch has fewer than ``topk_negatives``
    candidates per anchor, ``k`` shrinks to what it has (the reference requires a batch of at
    least ``k + 1``). Anchors short of positives or negatives are skipped. Only a Sampler's
    masks are consumed: the sort ranks in-batch candidates, so pair weights and extra
    negatives have no place in it. ``gather`` ("auto": under DDP) contrasts across ranks.
    A batch of one sample has no negatives to order: it raises :class:`sdk.ShapeError`.
    """

    requires = {"views": 2}
    consumes = frozenset({Input.PAIRS})
    batch_coupled = True
    accepts_sampler = True

    def __init__(self, steepness: Annotated[float, Gt(0)] = 1.0,
                 topk_negatives: Annotated[int, Ge(1)] = 10,
                 stop_gradient: bool = True, same_view_negatives: bool = True,
                 sampler: Sampler | None = None, gather: Gather = "auto"):
        super().__init__()
        self.steepness = steepness
        self.topk_negatives = topk_negatives
        self.stop_gradient = stop_gradient
        self.same_view_negatives = same_view_negatives
        self.sampler = sampler
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        c = contrastive.contrast(views, batch, gather=self.gather)
        contrastive.require_negatives(c, self.name)
        cand = c.candidates.detach() if self.stop_gradient else c.candidates
        sims = c.anchors @ cand.T
        sims = sims.to(torch.promote_types(sims.dtype, torch.float32))
        if self.sampler is None:
            positive, negative = contrastive.same_index_masks(c)
        else:
            pairs = contrastive.sampler_pairs(c, self.sampler)
            positive, negative = pairs.positive, pairs.negative
        n = c.candidates.shape[0]
        per_view = n // c.n_views
        if self.same_view_negatives:
            col_view = torch.arange(n, device=sims.device) // per_view
            negative = negative & (col_view[None, :] == (c.self_col // per_view)[:, None])
            available = per_view - 1
        else:
            available = n - c.n_views
        k = min(self.topk_negatives, available)
        n_pos = c.n_views - 1
        neg = sims.masked_fill(~negative, -_FILL).topk(k, dim=1).values
        pos = sims.masked_fill(~positive, _FILL).topk(n_pos, dim=1, largest=False).values
        valid = (negative.sum(1) >= k) & (positive.sum(1) >= n_pos)
        loss = torch.where(valid, groco_sorting_loss(pos, neg, self.steepness),
                           torch.zeros((), device=sims.device))
        return Loss(value=contrastive.masked_mean(loss, valid, c),
                    per_sample=contrastive.per_sample(loss, c))


CARD = Card(
    name="groco", kind="objective",
    title="Learning by Sorting: Self-supervised Learning with Group Ordering Constraints",
    paper="arXiv:2303.13912",
    summary="GroCo: the similarities of each anchor to its positives and its top-k negatives are "
            "sorted by a relaxed odd-even sorting network; BCE asks every positive to land in the "
            "top ranks. Defaults follow the reference configs (steepness 1, top-10 negatives, "
            "stop-gradient on the compared embeddings).",
    formula="s = [sort(top-k sims to negatives), sort(sims to positives)]; P = diffsort_cauchy(s); "
            "p_pos(i) = sum_{rank>=k} P[i,rank], p_neg(i) = sum_{rank<k} P[i,rank]; "
            "l = mean_i [BCE(p_pos(i), i>=k) + BCE(p_neg(i), i<k)]/2; L = mean over anchors",
    left_out="Multi-crop (small crops used only as anchors) and the bitonic network variant; "
             "the odd-even network with the Cauchy swap of the reference configs is implemented. "
             "Not from the paper: k shrinks to the negatives a small batch has (the reference "
             "needs batch >= k + 1), and a Sampler may replace the same-index pairs.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GroCo, card=CARD)
