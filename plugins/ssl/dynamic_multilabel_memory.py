"""Dynamic multi-label learning against a memory of instance features: each sample is labelled
with itself and with the memory entries that are similar enough and mutual nearest neighbours,
the similarity threshold relaxed over training.

Wang, Yang, Wu, Qi and Lei, "Self-similarity Driven Scale-invariant Learning for Weakly
Supervised Person Search", ICCV 2023 (arXiv:2302.12986); the memory-based multi-label learning
it builds on: Wang and Zhang, "Unsupervised Person Re-identification via Multi-label
Classification", CVPR 2020.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids


def multilabel_targets(scores: Tensor, memory: Tensor, valid: Tensor, own: Tensor, threshold: float,
                       k: int) -> Tensor:
    """Targets ``y [B, M]`` (float 0/1) of the anchors whose similarities to the memory are
    ``scores [B, M]``: ``y_ij = 1`` for the anchor's own entry (``own [B, M]``), and for every
    valid entry ``j`` with ``s_ij >= threshold``, ``j`` among the anchor's ``k`` most similar
    entries and the anchor's own entry among the ``k`` most similar to ``j`` in the memory
    (``memory [M, D]``, its own row left out). An anchor without an own entry has no mutual
    neighbours."""
    big = torch.finfo(scores.dtype).max
    k = min(k, scores.shape[1])
    s = scores.masked_fill(~valid[None], -big)
    top = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=1).indices, True)
    mem = memory.float() @ memory.float().T
    mem = mem.masked_fill(~valid[None], -big).fill_diagonal_(-big)
    mem_top = torch.zeros_like(mem, dtype=torch.bool).scatter_(
        1, mem.topk(min(k, mem.shape[1]), dim=1).indices, True)
    # own entry p_i of anchor i in the top-k of entry j: (own @ mem_top^T)_ij
    mutual = (own.float() @ mem_top.float().T) > 0
    neighbours = top & mutual & (scores >= threshold) & valid[None]
    return (neighbours | own).to(scores.dtype)


def hard_negative_bce(logits: Tensor, targets: Tensor, valid: Tensor, hard_fraction: float
                      ) -> Tensor:
    """Per anchor ``[B]``: the binary cross-entropy of ``sigmoid(logits)`` against ``targets``,
    averaged over the anchor's positives and its ``max(1, round(hard_fraction * M))`` valid
    negatives of highest logit (the hardest)."""
    m = logits.shape[1]
    n_hard = max(1, round(hard_fraction * m))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    negative = (targets == 0) & valid[None]
    ranked = logits.masked_fill(~negative, torch.finfo(logits.dtype).min)
    hard = torch.zeros_like(negative).scatter_(1, ranked.topk(min(n_hard, m), dim=1).indices, True) & negative
    chosen = (targets > 0) | hard
    return (bce * chosen).sum(1) / chosen.sum(1).clamp_min(1)


class DynamicMultilabelMemory(Objective):
    """The dynamic multi-label loss on each view's normalised embeddings ``f_i`` against the
    memory ``M`` published by a memory teacher (``memory_bank`` with ``num_negatives >=
    num_samples`` publishes every entry, updated ``m_i <- normalize(0.5 m_i + 0.5 f_i)`` after
    each step): ``s_ij = f_i . M_j``; targets from :func:`multilabel_targets` with the threshold
    moving linearly from ``threshold`` to ``final_threshold`` over the fit (the engine's
    progress); ``Batch.index`` names each sample's own entry (``-1``: none, an unknown
    sample); loss :func:`hard_negative_bce` on ``s / temperature``, averaged over views. Before
    the memory holds anything (the first step) the batch's own detached features stand in for it."""

    _plugin_name = "dynamic_multilabel_memory"
    requires = {"views": 1}  # Batch.index is read (and required) in forward; -1: no own entry
    consumes = frozenset({Input.EXTRA_NEGATIVES})
    batch_coupled = False  # each anchor against the shared (detached) memory

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.1,
                 threshold: Annotated[float, Interval(ge=-1, le=1)] = 0.6,
                 final_threshold: Annotated[float, Interval(ge=-1, le=1)] = 0.5,
                 k: Annotated[int, Ge(1)] = 10,
                 hard_fraction: Annotated[float, Interval(gt=0, le=1)] = 0.01):
        super().__init__()
        if final_threshold > threshold:
            raise ConfigError(f"dynamic_multilabel_memory: final_threshold={final_threshold} exceeds "
                              f"threshold={threshold} (the threshold relaxes)", param="final_threshold")
        self.temperature, self.k, self.hard_fraction = temperature, k, hard_fraction
        self.threshold, self.final_threshold = threshold, final_threshold
        self.current_threshold = threshold

    def set_progress(self, step: int, max_steps: int | None) -> None:
        """``t = t_0 + (t_1 - t_0) step / max_steps`` (``t_0`` when the length is unknown)."""
        frac = min(step, max_steps) / max_steps if max_steps else 0.0
        self.current_threshold = self.threshold + (self.final_threshold - self.threshold) * frac

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'dynamic_multilabel_memory'"
        b = views.batch_size
        if keys.NEGATIVES in views.extras:
            memory = views.extras[keys.NEGATIVES]
            valid = views.extras.get(keys.NEGATIVES_MASK, torch.ones(memory.shape[:1], dtype=torch.bool,
                                                                     device=memory.device))
            ids = views.extras.get(keys.NEGATIVES_INDEX)
            if ids is None:
                raise ShapeError(f"{owner}: Views.extras[{keys.NEGATIVES!r}] comes without "
                                 f"{keys.NEGATIVES_INDEX!r}, the dataset index of each entry")
        else:  # an empty memory (the first step): the batch's own features stand in for it
            memory = F.normalize(views.embeddings[0].detach().float(), dim=-1)
            valid = torch.ones(b, dtype=torch.bool, device=memory.device)
            ids = batch.index
        if memory.dim() != 2 or memory.shape[1] != views.embeddings[0].shape[-1] \
                or valid.shape != memory.shape[:1] or ids.shape != memory.shape[:1]:
            raise ShapeError(f"{owner}: Views.extras[{keys.NEGATIVES!r}] must be the memory [M, "
                             f"{views.embeddings[0].shape[-1]}] with its mask and dataset index [M], "
                             f"got {list(memory.shape)}, {list(valid.shape)}, {list(ids.shape)}")
        if batch.index is None:
            raise RequirementError(f"{owner} needs Batch.index (each sample's memory entry), got None")
        check_ids(owner, "Batch.index", batch.index)
        if batch.index.shape[0] != b:
            raise ShapeError(f"{owner}: Batch.index has {batch.index.shape[0]} rows, but Views hold {b}")
        memory = memory.detach().float()
        valid = valid.bool()
        own = (batch.index[:, None] == ids[None]) & (batch.index[:, None] >= 0) & valid[None]
        per_view = []
        for z in views.embeddings:
            scores = F.normalize(z.float(), dim=-1) @ memory.T
            targets = multilabel_targets(scores.detach(), memory, valid, own, self.current_threshold,
                                         self.k)
            per_view.append(hard_negative_bce(scores / self.temperature, targets, valid,
                                              self.hard_fraction))
        per_sample = torch.stack(per_view).mean(0)
        positives = (targets.sum(1) - own.sum(1)).float().mean()  # of the last view
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"extra_positives": positives.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views ``[B, 8]`` and a memory of ``2 B`` entries holding the batch's samples."""
        z = tuple(torch.randn(batch_size, 8, generator=generator).requires_grad_() for _ in range(2))
        memory = F.normalize(torch.randn(2 * batch_size, 8, generator=generator), dim=-1)
        extras = {keys.NEGATIVES: memory, keys.NEGATIVES_MASK: torch.ones(2 * batch_size, dtype=torch.bool),
                  keys.NEGATIVES_INDEX: torch.arange(2 * batch_size)}
        return Views(embeddings=z, extras=extras), Batch(index=torch.arange(batch_size))


CARD = Card(
    name="dynamic_multilabel_memory", kind="objective",
    title="Self-similarity Driven Scale-invariant Learning for Weakly Supervised Person Search",
    paper="arXiv:2302.12986",
    summary="Each sample is labelled with its own memory entry and with the entries that are "
            "similar enough and mutual k-nearest neighbours (the threshold relaxed over training); "
            "binary cross-entropy on the similarities over the positives and the hardest "
            "negatives. Use with the memory_bank teacher (momentum 0.5, the whole bank).",
    formula="s_ij = f_i . M_j; y_ij = 1[j = i] or (s_ij >= t and j in topk_i(s) and i in topk_j(M M^T)), "
            "k = 10, t: 0.6 -> 0.5 linearly; L_i = mean_{j in P_i u H_i} BCE(sigmoid(s_ij / 0.1), y_ij), "
            "H_i: the hardest 1% negatives; M_i <- normalize(0.5 M_i + 0.5 f_i)",
    left_out="The paper's full text was not available to check the label rule: the mutual "
             "top-k filter, the 0.6 -> 0.5 schedule, BCE at tau = 0.1 and the 1% hard negatives "
             "are reconstructed (MMCL, which the paper builds on, uses a squared loss on the "
             "cosine with delta = 5). The memory is the memory_bank teacher's. The multi-scale "
             "exemplar branch and its scale-invariant loss, the joint person detector (Faster "
             "R-CNN / OIM), the clustering branch and PRW / CUHK-SYSU are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DynamicMultilabelMemory, card=CARD)
