"""DecoupledSoftmax: a multi-label softmax in which each positive competes with the negatives only.

Gupta, Khatri, Rawat, Bhojanapalli, Jain & Dhillon, "Dual-Encoders for Extreme Multi-Label
Classification", ICLR 2024 (arXiv:2310.10636), Sec. 4; reduction (the mean over a query's
positives, then over queries) and the temperature 0.05 of normalised embeddings as in the
authors' code (github.com/nilesh2797/DEXML, losses.py and configs/dual-encoder.yaml).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt
from torch.autograd.function import once_differentiable

from sdk import classification as cls
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


class _TemperatureCrossEntropy(torch.autograd.Function):
    """``-log softmax(z / tau)_y`` [B] keeping only ``log softmax(z / tau)``; the gradient in closed
    form, ``dL/dz = (softmax(z / tau) - onehot(y)) / tau`` (the softmax taken again from the kept
    log-probabilities by torch's fused kernel: no autograd copy of ``z / tau`` and its gradient)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        log_p = torch.log_softmax(z / temperature, -1)
        ctx.temperature = temperature
        ctx.save_for_backward(log_p, ids)
        return -log_p.gather(-1, ids[:, None]).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_p, ids = ctx.saved_tensors
        d = torch.softmax(log_p, -1)
        d.scatter_add_(-1, ids[:, None], -torch.ones_like(log_p[:, :1]))
        return d.mul_((grad / ctx.temperature)[:, None]), None, None


def decoupled_softmax_loss(scores: torch.Tensor, positive: torch.Tensor,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query ``-(1 / |P_i|) sum_{l in P_i} w_il log(e^{s_il} / (e^{s_il} + sum_{l' not in P_i}
    e^{s_il'}))`` [B] (0 for a query without positives); ``positive`` [B, N] booleans."""
    log_p = cls.decoupled_log_probs(scores, positive)
    if weight is not None:
        log_p = weight.to(log_p.dtype) * log_p
    return -log_p.sum(-1) / positive.sum(-1).clamp_min(1)


class DecoupledSoftmaxXMC(Objective):
    """DecoupledSoftmax on ``Views.logits`` [B, N] (query-label similarities; the paper's
    cosines of normalised query and label embeddings, divided by ``temperature``) against
    ``Batch.targets``: multi-label sets [B, N] (entries > 0 are positives) or class ids [B]
    (one positive: cross-entropy)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.05, weighted: bool = False):
        super().__init__()
        self.temperature, self.weighted = temperature, weighted

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets("decoupled_softmax_xmc", z, batch.targets, soft=False, multilabel=True)
        if t.ids is not None:  # one positive per query: cross-entropy at temperature tau
            per_sample = _TemperatureCrossEntropy.apply(cls.upcast(z), t.ids, self.temperature)
        else:
            weight = t.dense if self.weighted else None
            per_sample = decoupled_softmax_loss(z / self.temperature, t.dense > 0, weight)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = torch.randn(batch_size, 6, generator=generator).clamp(-1, 1).requires_grad_()
        targets = (torch.rand(batch_size, 6, generator=generator) < 0.3).float()
        return Views(logits=logits), Batch(targets=targets)


CARD = Card(
    name="decoupled_softmax_xmc", kind="objective",
    title="Dual-Encoders for Extreme Multi-Label Classification", paper="arXiv:2310.10636",
    summary="Multi-label softmax whose denominator for each positive holds that positive and "
            "the negatives only, so the positives of a query do not compete with each other.",
    formula="s = logits / tau; L_i = -(1 / |P_i|) sum_{l in P_i} log(e^{s_il} / (e^{s_il} + "
            "sum_{l' not in P_i} e^{s_il'})); L = mean_i L_i (0 for a query without positives)",
    left_out="The dual encoder itself (query and label towers, gradient caching over all labels, "
             "the distributed label pool) is the model's part: the logits are the similarities "
             "of a query to every label. The authors' sampling of one positive per step "
             "(its expectation is the full mean implemented here), hard-negative mining and the "
             "SoftTop-k loss are not implemented. tau = 0.05 assumes cosine similarities; use "
             "temperature=1 for raw logits. weighted=True multiplies each positive's term by "
             "its target value (the code's loss_weighted).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DecoupledSoftmaxXMC, card=CARD)
