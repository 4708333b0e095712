"""AnyLoss: a confusion-matrix metric made differentiable by amplified predictions, used as a loss.

Han, Moniz & Chawla, "AnyLoss: Transforming Classification Metrics into Loss Functions",
KDD 2024 (arXiv:2405.14745): A(p) = 1 / (1 + exp(-L (p - 1/2))), L = 73; the confusion matrix's
entries are sums of A(p) and 1 - A(p) over the batch; the loss is 1 - metric.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt

from sdk import classification as cls
from sdk.card import Card
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

METRICS = ("f1", "fbeta", "accuracy", "balanced_accuracy", "gmean")


def amplify(p: torch.Tensor, amplifier: float = 73.0) -> torch.Tensor:
    """``A(p) = sigmoid(L (p - 1/2))``: probabilities pushed towards 0 and 1."""
    return torch.sigmoid((amplifier * p).sub_(amplifier / 2))


def confusion(y_hat: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Soft ``(TP, FN, FP, TN)`` per class [C] from amplified predictions and 0/1 targets [N, C]."""
    return ((y * y_hat).sum(0), (y * (1 - y_hat)).sum(0), ((1 - y) * y_hat).sum(0),
            ((1 - y) * (1 - y_hat)).sum(0))


def confusion_of_ids(y_hat: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`confusion` for class-id targets [N], without their one-hot matrix: ``TP_c`` sums
    ``y~_ic`` over the samples of class ``c``, the rest follows from counts and column sums."""
    n, c = y_hat.shape
    tp = y_hat.new_zeros(c).index_add(0, ids, y_hat.gather(1, ids[:, None]).squeeze(1))
    count = y_hat.new_zeros(c).index_add(0, ids, y_hat.new_ones(n))
    fp = y_hat.sum(0) - tp
    return tp, count - tp, fp, n - count - fp


def metric_value(metric: str, tp, fn, fp, tn, beta: float = 1.0) -> torch.Tensor:
    """The metric of a (soft) confusion matrix, per class."""
    tiny = torch.finfo(tp.dtype).tiny
    if metric in ("f1", "fbeta"):
        b2 = 1.0 if metric == "f1" else beta ** 2
        return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp).clamp_min(tiny)
    if metric == "accuracy":
        return (tp + tn) / (tp + fn + fp + tn)
    tpr, tnr = tp / (tp + fn).clamp_min(tiny), tn / (tn + fp).clamp_min(tiny)
    if metric == "balanced_accuracy":
        return (tpr + tnr) / 2
    return (tpr * tnr + tiny).sqrt()


class AnyLoss(Objective):
    """``1 - metric`` of the batch's soft confusion matrix. One logit (``Views.logits`` [B, 1],
    class ids 0/1): ``p = sigmoid(z)``, the binary metric. ``C >= 2`` logits: with class ids
    ``p = softmax(z)``, with multi-label sets [B, C] ``p = sigmoid(z)`` per class; the metric of
    each class against the rest, averaged over the classes (macro)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = True

    def __init__(self, metric: Annotated[str, one_of(METRICS)] = "f1",
                 beta: Annotated[float, Gt(0)] = 1.0, amplifier: Annotated[float, Ge(1)] = 73.0,
                 gather: Gather = "auto"):
        super().__init__()
        self.metric, self.beta, self.amplifier, self.gather = metric, beta, amplifier, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        z, y = views.logits, batch.targets
        if z.shape[1] == 1:
            if y.dim() != 1:
                raise ShapeError(f"anyloss: with one logit Batch.targets must be class ids 0/1 "
                                 f"[{z.shape[0]}], got {list(y.shape)}")
            check_ids("anyloss", "Batch.targets", y, 2 if y.device.type == "cpu" else None)
            p, target = torch.sigmoid(cls.upcast(z)), y[:, None].to(cls.compute_dtype(z))
        else:
            t = cls.targets("anyloss", z, y, multilabel=y.dim() == 2)
            zf = cls.upcast(z)
            p = zf.softmax(-1) if t.ids is not None else torch.sigmoid(zf)
            target = t.ids if t.ids is not None else t.dense
        y_hat = amplify(p, self.amplifier)
        if resolve_gather(self.gather):
            y_hat, target = gather_with_grad(y_hat), gather_no_grad(target)
        counts = confusion_of_ids(y_hat, target) if target.dim() == 1 else confusion(y_hat, target)
        value = 1 - metric_value(self.metric, *counts, beta=self.beta).mean()
        return Loss(value=value)


CARD = Card(
    name="anyloss", kind="objective",
    title="AnyLoss: Transforming Classification Metrics into Loss Functions",
    paper="arXiv:2405.14745",
    summary="1 - a confusion-matrix metric (F1, F-beta, accuracy, balanced accuracy, G-mean) "
            "of the batch, made differentiable by amplified probabilities.",
    formula="y~ = 1 / (1 + exp(-L (p - 1/2))); TP = sum y y~, FN = sum y (1 - y~), "
            "FP = sum (1 - y) y~, TN = sum (1 - y)(1 - y~); L = 1 - metric(TP, FN, FP, TN)",
    left_out="The paper treats binary classification; the multi-class form (softmax, one-vs-rest "
             "per class, macro average) and the multi-label form are extensions. The metric is "
             "computed over the (gathered) batch, so the loss has no per-sample terms. "
             "G-mean adds the smallest normal number under the square root (finite gradient at 0).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AnyLoss, card=CARD)
