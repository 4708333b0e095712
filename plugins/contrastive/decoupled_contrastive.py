"""Decoupled contrastive learning (DCL) and its weighted form (DCLW).

Yeh et al., "Decoupled Contrastive Learning", ECCV 2022 (arXiv:2110.06848).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.distributed as dist
from annotated_types import Gt
from torch import Tensor

from sdk import contrastive, distributed
from sdk.card import Card
from sdk.distributed import Gather
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Sampler
from sdk.types import Batch, Loss, Views


def von_mises_fisher_weight(pos_sims: Tensor, sigma: float, mask: Tensor | None = None, *,
                            gather: Gather = False) -> Tensor:
    """DCLW's positive weight ``w = 2 - exp(s/sigma) / mean_pairs exp(s/sigma)`` (detached).

    ``pos_sims`` holds the cosine similarity of every positive pair (entries where ``mask`` is
    false are ignored); the mean runs over every positive pair of the batch, of every rank when
    ``gather`` (for two views this is ``2 - N softmax_i(<z1_i, z2_i> / sigma)``).
    """
    s = pos_sims.detach().float()
    ok = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    peak = torch.where(ok, s, -1.0).amax()  # cosine similarities are >= -1; -1 when no pair
    world = distributed.resolve_gather(gather)
    if world:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    e = torch.where(ok, torch.exp((s - peak) / sigma), 0.0)
    stats = torch.stack([e.sum(), ok.sum().to(e.dtype)])
    if world:
        dist.all_reduce(stats)
    mean = (stats[0] / stats[1].clamp_min(1.0)).clamp_min(torch.finfo(e.dtype).tiny)
    return 2.0 - e / mean


def decoupled_contrastive_loss(z1: Tensor, z2: Tensor, *more_views: Tensor, temperature: float = 0.1,
                               sigma: float | None = None, sampler: Sampler | None = None,
                               batch: Batch | None = None, gather: Gather = "auto") -> Tensor:
    """Mean DCL (DCLW when ``sigma`` is set) over all anchors; see :class:`DecoupledContrastive`."""
    return DecoupledContrastive(temperature=temperature, sigma=sigma, sampler=sampler, gather=gather)(
        Views(embeddings=(z1, z2, *more_views)), batch).value


class DecoupledContrastive(Objective):
    """For anchor i with positives P(i) and negatives N(i) (views of other samples)::

        l_i = -1/|P(i)| sum_{p in P(i)} w_ip s_ip / t + log sum_{k in N(i)} exp(s_ik / t)

    with cosine similarity s: the positive pair is removed from the denominator. ``w = 1``
    (DCL) unless ``sigma`` is set (DCLW: ``w_ip = 2 - exp(s_ip/sigma) / mean_pairs
    exp(s/sigma)``, a constant; the paper uses sigma = 0.5). Mean over all anchors of all views;
    Sampler masks, synthetic and memory negatives work as in ``nt_xent``; ``gather`` ("auto":
    under DDP) contrasts across ranks. A batch of one sample has no negatives (the denominator
    would be empty): it raises :class:`sdk.ShapeError`.
    """

    requires = {"views": 2}
    consumes = frozenset({Input.PAIRS, Input.PAIR_WEIGHTS, Input.EXTRA_NEGATIVES})
    batch_coupled = True
    accepts_sampler = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.1,
                 sigma: Annotated[float, Gt(0)] | None = None,
                 sampler: Sampler | None = None, gather: Gather = "auto"):
        super().__init__()
        self.temperature, self.sigma = temperature, sigma
        self.sampler, self.gather = sampler, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        c = contrastive.contrast(views, batch, gather=self.gather)
        contrastive.require_negatives(c, self.name)
        pairs = None if self.sampler is None else contrastive.sampler_pairs(c, self.sampler)
        extra, extra_mask = contrastive.extra_negatives(c, pairs)
        extra = None if extra is None else extra / self.temperature
        if pairs is None:
            scale = None
            if self.sigma is not None:
                cols = contrastive.positive_columns(c)
                sims = torch.einsum("ad,akd->ak", c.anchors, c.candidates[cols])
                scale = von_mises_fisher_weight(sims, self.sigma, gather=self.gather)
            loss = contrastive.instance_info_nce(c, self.temperature, positive_in_denominator=False,
                                                 extra_negative_logits=extra,
                                                 extra_negative_mask=extra_mask, positive_scale=scale)
            return Loss(value=loss.mean(), per_sample=contrastive.per_sample(loss, c))
        sims = c.anchors @ c.candidates.T
        scale = None if self.sigma is None else von_mises_fisher_weight(
            sims, self.sigma, pairs.positive, gather=self.gather)
        loss, valid = contrastive.info_nce(sims / self.temperature, pairs.positive, pairs.negative,
                                           weight=pairs.weight, positive_in_denominator=False,
                                           extra_negative_logits=extra, extra_negative_mask=extra_mask,
                                           positive_scale=scale)
        return Loss(value=contrastive.masked_mean(loss, valid, c),
                    per_sample=contrastive.per_sample(loss, c))


CARD = Card(
    name="decoupled_contrastive", kind="objective",
    title="Decoupled Contrastive Learning", paper="arXiv:2110.06848",
    summary="InfoNCE with the positive pair removed from the denominator (DCL); with sigma, the "
            "positive term is weighted by a von Mises-Fisher weight (DCLW). Sampler-aware, "
            "multi-view, gathers across ranks.",
    formula="l_i = -mean_{p in P(i)} w_ip cos(z_i,z_p)/t + log sum_{k in N(i)} exp(cos(z_i,z_k)/t); "
            "w = 1 (DCL) or w_ip = 2 - exp(cos(z_i,z_p)/sigma) / mean_{positive pairs} "
            "exp(cos/sigma) (DCLW, detached); L = mean over all 2N anchors",
    left_out="DCLW's weight is normalised over the whole (gathered) batch; lightly's DCLWLoss "
             "normalises over each rank's local batch (identical in one process).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DecoupledContrastive, card=CARD)
