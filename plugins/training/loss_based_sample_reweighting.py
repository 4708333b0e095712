"""Dynamic loss-based sample reweighting: after a burn-in of uniform steps, each sample's loss is
rescaled to [-delta, delta] within the (global) batch, mapped by a strategy function and turned
into weights by a KL-regularised softmax, so that, e.g., already-learnt low-loss samples weigh
less.

Sow, Woisetschläger, Bhatt, Barbosa, Rojas & Liang, "Dynamic Loss-Based Sample Reweighting for
Improved Large Language Model Pretraining", ICLR 2025 (arXiv:2502.06733), following the
authors' code (sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025: ``normalize_losses``,
``apply_strategy``, ``scale_losses``).
"""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from sdk.card import Card
from sdk.constraints import one_of
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows, gathered, global_softmax
from sdk.types import Batch

STRATEGIES = ("linupper", "quadratic", "extremes", "upper", "uniform")


def strategy_scores(h: Tensor, strategy: str, delta: float = 1.0) -> Tensor:
    """``f(h)`` for losses ``h`` rescaled to ``[-delta, delta]``: LinUpper ``min(h + delta,
    delta)`` (low losses down-weighted, the upper half equal), Quadratic ``1 - h^2 / delta^2``
    (the extremes down-weighted; the authors' ``mid``), Extremes ``|h|``, Upper ``(h + delta) / 2``,
    Uniform ``h`` unchanged (the authors' baseline: still a softmax of the rescaled losses)."""
    if strategy == "linupper":
        return torch.minimum(h + delta, torch.full_like(h, delta))
    if strategy == "quadratic":
        return 1 - h ** 2 / delta ** 2
    if strategy == "extremes":
        return h.abs()
    if strategy == "upper":
        return 0.5 * h + 0.5 * delta
    return h


def rescale(losses: Tensor, low: Tensor, high: Tensor, delta: float = 1.0) -> Tensor:
    """``2 delta (l - (high + low) / 2) / (high - low)``: ``[low, high]`` onto ``[-delta, delta]``
    (the spread floored at 1e-6, as the authors' code does)."""
    spread = (high - low).clamp_min(1e-6)
    return 2 * delta * losses / spread - delta * (high + low) / spread


def loss_based_weights(per_sample: Tensor, *, strategy: str = "linupper", r: float = 1.0,
                       delta: float = 1.0) -> Tensor:
    """One process's weights (summing to 1): ``softmax(f(h(l)) / r)``."""
    l = per_sample.detach().float()
    f = strategy_scores(rescale(l, l.min(), l.max(), delta), strategy, delta)
    return torch.softmax(f / r, dim=0)


class LossBasedSampleReweighting(Reweighter):
    """For the first ``burnin`` training batches the weights are uniform (``1 / B``); after,
    ``w = softmax(f(h(l)) / r)`` over the global batch, detached, with ``h`` rescaling by the
    global batch's min and max loss. ``normalize = False``: the weights sum to 1 (under DDP each
    rank keeps its rows times the world size, as the authors' code does), so the loss is
    ``sum_i w_i l_i``. The count of training batches is a buffer (checkpointed); evaluation
    mode neither counts nor changes it."""

    normalize = False

    def __init__(self, strategy: Annotated[str, one_of(STRATEGIES)] = "linupper",
                 r: Annotated[float, annotated_types.Gt(0)] = 1.0,
                 delta: Annotated[float, annotated_types.Gt(0)] = 1.0,
                 burnin: Annotated[int, annotated_types.Ge(0)] = 1000):
        super().__init__()
        self.strategy, self.r, self.delta, self.burnin = strategy, r, delta, burnin
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows("reweighter 'loss_based_sample_reweighting'", per_sample, batch)
        l = per_sample.detach().float()
        everyone = gathered(l)
        f = strategy_scores(rescale(l, everyone.min(), everyone.max(), self.delta), self.strategy,
                            self.delta)
        reweighted = global_softmax(f / self.r)
        uniform = torch.full_like(l, 1.0 / l.shape[0])  # 1 / B globally, times the world size
        w = torch.where(self.batches >= self.burnin, reweighted, uniform)
        if self.training:
            self.batches += 1
        return w.to(per_sample.dtype)


CARD = Card(
    name="loss_based_sample_reweighting", kind="reweighter",
    title="Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining",
    paper="arXiv:2502.06733",
    summary="After a uniform burn-in, per-sample weights softmax(f(h)/r) of the losses rescaled "
            "to [-delta, delta] in the batch, f a strategy (LinUpper down-weights low-loss, "
            "already learnt samples); weights detached.",
    formula="h_i = 2 delta (l_i - (l_max + l_min)/2) / (l_max - l_min); f = min(h + delta, delta) "
            "(linupper) | 1 - h^2/delta^2 (quadratic) | |h| (extremes) | (h + delta)/2 (upper) | h "
            "(uniform); w = softmax(f / r) over the global batch; loss = sum_i w_i l_i; uniform "
            "w = 1/B for the first burnin batches",
    left_out="The LLM pre-training setting (token-level losses averaged per sequence with the "
             "length normalisation of the authors' code: here one loss per sample) and the "
             "authors' r schedule hook. burnin counts training batches (micro-batches), not "
             "optimizer steps. Defaults: linupper, r = 1, delta = 1, burnin = 1000 as in the "
             "authors' README (their configs also use the quadratic 'mid').",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LossBasedSampleReweighting, card=CARD)
