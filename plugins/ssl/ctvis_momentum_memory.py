"""CTVIS: contrastive items built from a similarity-guided momentum memory of each instance, as
at inference, instead of one reference frame.

Ying, Zhong, Mao, Zhou, Wang, Yang & Shen, "CTVIS: Consistent Training for Online Video Instance
Segmentation", ICCV 2023 (arXiv:2307.12616); formula and defaults from the authors' code
(github.com/KainingYing/CTVIS, ``ctvis/modeling/cl_plugin/ct_cl_plugin.py``).

Frames ``t = 0 .. T-1`` (the views) of ``B`` instances (the rows), embeddings ``e_t(i)``. Each
instance's memory starts at its first embedding and fuses the later ones with a weight given by
their agreement with its history::

    m_0 = e_0;  beta_t = max(0, mean_{s < t} cos(e_s, e_t));  m_t = (1 - beta_t) m_{t-1} + beta_t e_t

For every anchor ``v = e_t(i)``, ``t >= 1``: the positive ``k+`` is the memory ``m_{t-1}(i)``
(probability ``memory_prob``) or the last embedding ``e_{t-1}(i)``; the negatives ``k-`` are the
other instances' embeddings in frame ``t - 1``. IDOL's losses on dot products and cosines::

    L_reid = log(1 + sum_{k-} exp(v.k- - v.k+));  L_aux = mean_{k in {k+, k-}} (cos(v, k) - c_k)^2
    L = reid_weight mean L_reid + aux_weight mean L_aux        (c_k = 1 for k+, 0 for k-)
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import at_least_float32
from sdk.types import Batch, Loss, Views


def similarity_guided_memory(frames: list[Tensor] | tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """``(memory, beta)``: the memory ``m_t`` ``[T, B, D]`` of each instance after frames
    ``0 .. t`` and the fusion weights ``beta_t`` ``[T, B]`` (``beta_0 = 1``: the first sighting
    sets the memory). Differentiable, as the authors' (nothing is detached)."""
    unit = [F.normalize(e, dim=-1) for e in frames]
    memory, betas = [frames[0]], [frames[0].new_ones(frames[0].shape[0])]
    for t in range(1, len(frames)):
        history = torch.stack(unit[:t])  # [t, B, D]
        beta = ((history * unit[t]).sum(-1).mean(0)).clamp_min(0)
        memory.append((1 - beta)[:, None] * memory[-1] + beta[:, None] * frames[t])
        betas.append(beta)
    return torch.stack(memory), torch.stack(betas)


def idol_terms(anchor: Tensor, positive: Tensor, negatives: Tensor,
               own: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per anchor ``[B]``: ``log(1 + sum_j exp(v.k-_j - v.k+))`` and ``mean (cos - label)^2`` over
    the positive (label 1) and the negatives (label 0), for anchors ``[B, D]``, one positive each
    ``[B, D]`` and candidate negatives ``[N, D]``; ``own`` ``[B]``: the row of ``negatives`` that
    is the anchor's own instance (excluded), or None."""
    pos = (anchor * positive).sum(-1, keepdim=True)
    diff = anchor @ negatives.T - pos  # [B, N]
    keep = torch.ones_like(diff, dtype=torch.bool)
    if own is not None:
        keep[torch.arange(diff.shape[0], device=diff.device), own] = False
    diff = diff.masked_fill(~keep, float("-inf"))
    reid = torch.logsumexp(torch.cat([diff.new_zeros(diff.shape[0], 1), diff], dim=1), dim=1)
    a = F.normalize(anchor, dim=-1)
    cos_pos = (a * F.normalize(positive, dim=-1)).sum(-1)
    cos_neg = a @ F.normalize(negatives, dim=-1).T
    neg_sq = (cos_neg.pow(2) * keep).sum(-1)
    aux = ((cos_pos - 1).pow(2) + neg_sq) / (1 + keep.sum(-1))
    return reid, aux


class CtvisMomentumMemory(Objective):
    """CTVIS's contrastive items (see the module docstring) on the views as frames of a clip
    (``Views.embeddings[t]``: ``[B, D]``, row ``i`` the same instance in every frame; at least 2
    frames). The memory lives within the clip, as the authors empty it for every video, so there
    is no state across steps.

    The random choice of the positive is replaced by its expectation: every anchor's loss is
    ``memory_prob`` times its loss with the memory as positive plus ``1 - memory_prob`` times its
    loss with the last embedding (the same expected gradient, without the draw: 1 uses the
    memory only, 0 is IDOL's one reference frame). The negatives are every other instance of the
    batch, so it couples samples: ``gather`` ("auto": under DDP) takes them from the global
    batch."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, memory_prob: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 reid_weight: Annotated[float, Ge(0)] = 2.0,
                 aux_weight: Annotated[float, Ge(0)] = 3.0, gather: Gather = "auto"):
        super().__init__()
        self.memory_prob, self.reid_weight, self.aux_weight = memory_prob, reid_weight, aux_weight
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        frames = [at_least_float32(e) for e in views.embeddings]
        memory, beta = similarity_guided_memory(frames)
        b = frames[0].shape[0]
        gathered = resolve_gather(self.gather)
        pool = [gather_with_grad(e) for e in frames[:-1]] if gathered else frames[:-1]
        own = torch.arange(b, device=frames[0].device) + (rank() * b if gathered else 0)
        choices = [(p, positives) for p, positives in
                   ((self.memory_prob, memory), (1 - self.memory_prob, torch.stack(frames)))
                   if p > 0]
        reid_sum, aux_sum = frames[0].new_zeros(b), frames[0].new_zeros(b)
        for t in range(1, len(frames)):
            for p, positives in choices:
                reid, aux = idol_terms(frames[t], positives[t - 1], pool[t - 1], own)
                reid_sum, aux_sum = reid_sum + p * reid, aux_sum + p * aux
        items = len(frames) - 1
        reid, aux = reid_sum / items, aux_sum / items
        per_sample = self.reid_weight * reid + self.aux_weight * aux
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"reid": reid.mean().detach(), "aux_reid": aux.mean().detach(),
                          "beta": beta[1:].mean().detach()})


CARD = Card(
    name="ctvis_momentum_memory", kind="objective",
    title="CTVIS: Consistent Training for Online Video Instance Segmentation",
    paper="arXiv:2307.12616",
    summary="Contrastive items for tracking embeddings drawn from a similarity-guided momentum "
            "memory of each instance (as the tracker uses at inference) instead of one reference "
            "frame; IDOL's pairwise log-sum-exp and cosine losses.",
    formula="m_0 = e_0; beta_t = max(0, mean_{s<t} cos(e_s, e_t)); m_t = (1-beta_t) m_{t-1} + "
            "beta_t e_t; for v = e_t(i), t >= 1: k+ = m_{t-1}(i) (prob p) or e_{t-1}(i), "
            "k- = e_{t-1}(j != i); L = 2 mean log(1 + sum exp(v.k- - v.k+)) + "
            "3 mean_items mean_k (cos(v, k) - c_k)^2",
    left_out="The video instance segmentation model (Mask2Former queries, Hungarian matching to "
             "ground truth), the inference tracker and the rotated-image pseudo-videos are left "
             "out: the frames are the views and the instances the rows, all present in every "
             "frame (no appearing or disappearing instances, so no future-frame positives). The "
             "Bernoulli(0.5) choice of the positive is replaced by its expectation "
             "(memory_prob). The negatives are all other instances of the (global) batch in the "
             "previous frame, where the authors sample 99 other decoder queries of that frame. "
             "The optional ID-switch noise (off in the authors' configs) is not implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CtvisMomentumMemory, card=CARD)
