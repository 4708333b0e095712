"""CACR: contrastive attraction and contrastive repulsion with conditional pair weights.

Zheng, Chen, Yao, Yang, Li, Zhang, Zhou, "Contrastive Attraction and Contrastive Repulsion for
Representation Learning", TMLR 2023 (arXiv:2105.03746).

On L2-normalised embeddings, each query is attracted to the other views of its sample with
weights from a softmax that favours the *farthest* positives, and repelled from the samples of
another view with weights from a softmax that favours the *closest* negatives. Following the
reference code: the attraction of view ``x`` runs over every other view of the same sample;
the repulsion runs over each unordered view pair ``(x, y)``, ``x < y``, with ``x`` as queries
and the other samples of ``y`` as negatives; weights are not detached.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Sampler
from sdk.types import Batch, Loss, Views


def conditional_expectation(logits: Tensor, cost: Tensor, mask: Tensor,
                            weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``sum_j pi_j cost_j`` with ``pi_j = w_j exp(logits_j) / sum_{k in mask} w_k exp(logits_k)``
    over the last dimension, restricted to ``mask``; returns ``(value, any(mask))``."""
    log_norm = contrastive.masked_logsumexp(logits, mask, weight)
    x = logits - log_norm[..., None]
    if weight is not None:
        x = x + weight.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).log()
    pi = x.masked_fill(~mask, torch.finfo(x.dtype).min).exp()  # masked entries underflow to 0
    return (pi * cost).sum(-1), mask.any(-1)


def cacr_loss(z1: Tensor, z2: Tensor, *more_views: Tensor, alpha: float = 1.0, beta: float = 1.0,
              tau_pos: float = 1.0, tau_neg: float = 1.0, sampler: Sampler | None = None,
              batch: Batch | None = None, gather: Gather = "auto") -> Tensor:
    """``L_CA + L_CR`` over the given views; see :class:`CACR`."""
    return CACR(alpha=alpha, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg, sampler=sampler,
                gather=gather)(Views(embeddings=(z1, z2, *more_views)), batch).value


class CACR(Objective):
    """``L = L_CA + L_CR`` with ``d_ij = ||z_i - z_j||^2`` on the unit sphere:

    * ``L_CA = mean_{x,i} sum_{k != x} pi+_k alpha d(z^x_i, z^k_i)``,
      ``pi+ = softmax_k(tau_pos d)`` (the farther a positive, the more it is pulled);
    * ``L_CR = mean_{x<y, i} sum_{j != i} pi-_j (-beta d(z^x_i, z^y_j))``,
      ``pi- = softmax_j(-tau_neg d)`` (the closer a negative, the more it is pushed).

    ``tau_pos = tau_neg = 0`` gives uniform weights (mean positive distance minus mean
    cross-view negative distance). A Sampler replaces the positive / negative sets (its pair
    weights multiply the conditional distributions); the repulsion keeps its view-pair blocks.
    Extra negatives (synthetic or from a memory) are not consumed: the repulsion is an
    expectation over the other samples of one view, which such negatives do not belong to.
    ``gather`` ("auto": under DDP) contrasts across ranks.
    """

    requires = {"views": 2}
    consumes = frozenset({Input.PAIRS, Input.PAIR_WEIGHTS})
    batch_coupled = True
    accepts_sampler = True

    def __init__(self, alpha: Annotated[float, Ge(0)] = 1.0, beta: Annotated[float, Ge(0)] = 1.0,
                 tau_pos: Annotated[float, Ge(0)] = 1.0, tau_neg: Annotated[float, Ge(0)] = 1.0,
                 sampler: Sampler | None = None, gather: Gather = "auto"):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.tau_pos, self.tau_neg = tau_pos, tau_neg
        self.sampler = sampler
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        c = contrastive.contrast(views, batch, gather=self.gather)
        d2 = (2 - 2 * (c.anchors @ c.candidates.T).float()).clamp_min(0)
        if self.sampler is None:
            positive, negative = contrastive.same_index_masks(c)
            weight = None
        else:
            pairs = contrastive.sampler_pairs(c, self.sampler)
            positive, negative, weight = pairs.positive, pairs.negative, pairs.weight
        attract, valid_a = conditional_expectation(self.tau_pos * d2, self.alpha * d2, positive,
                                                   weight)
        # repulsion: one conditional distribution per (query, later view) block
        a, n = d2.shape
        per_view = n // c.n_views
        col_view = torch.arange(n, device=d2.device) // per_view
        later = col_view[None, :] > (c.self_col // per_view)[:, None]
        blocks = (a, c.n_views, per_view)
        repel, valid_r = conditional_expectation(
            (-self.tau_neg * d2).view(blocks), (-self.beta * d2).view(blocks),
            (negative & later).view(blocks), None if weight is None else weight.view(blocks))
        n_a, n_r = valid_a.sum().clamp_min(1), valid_r.sum().clamp_min(1)
        l_ca = contrastive.masked_mean(attract, valid_a, c)
        l_cr = contrastive.masked_mean(repel, valid_r, c)
        b = c.batch_size
        per_sample = ((attract * valid_a).view(c.n_views, b).sum(0) * b / n_a
                      + (repel * valid_r).sum(1).view(c.n_views, b).sum(0) * b / n_r)
        return Loss(value=l_ca + l_cr, per_sample=per_sample,
                    logs={"attraction": l_ca.detach(), "repulsion": l_cr.detach()})


CARD = Card(
    name="cacr", kind="objective",
    title="Contrastive Attraction and Contrastive Repulsion for Representation Learning",
    paper="arXiv:2105.03746",
    summary="Positives attracted and negatives repelled under conditional (softmax) "
            "distributions over squared distances: far positives and close negatives weigh "
            "most. Defaults alpha = beta = tau+ = tau- = 1 from the reference code; use V >= 3 "
            "views for the attraction weights to matter (the reference uses 5).",
    formula="d = ||z_a - z_b||^2; L_CA = mean_{x,i} sum_{k!=x} softmax_k(tau+ d) alpha d(z^x_i,"
            "z^k_i); L_CR = mean_{x<y,i} sum_{j!=i} softmax_j(-tau- d) (-beta d(z^x_i, z^y_j)); "
            "L = L_CA + L_CR",
    left_out="The debiased variant (with_debiased / tau_plus) and the RBF-cost variant that the "
             "reference code keeps commented out.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CACR, card=CARD)
