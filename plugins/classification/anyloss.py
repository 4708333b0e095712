"""AnyLoss: a confusion-matrix metric made differentiable by amplified predictions, used as a loss.

Han, Moniz & Chawla, "AnyLoss: Transforming Classification Metrics into Loss Functions",
KDD 2024 (arXiv:2405.14745): A(p) = 1 / (1 + exp(-L (p - 1/2))), L = 73; the confusion matrix's
entries are sums of A(p) and 1 - A(p) over the batch; the loss is 1 - metric.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch.autograd.function import once_differentiable

from sdk import classification as cls
from sdk.card import Card
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_with_grad, resolve_gather, sum_over_ranks
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

METRICS = ("f1", "fbeta", "accuracy", "balanced_accuracy", "gmean")


def amplify(p: torch.Tensor, amplifier: float = 73.0) -> torch.Tensor:
    """``A(p) = sigmoid(L (p - 1/2))``: probabilities pushed towards 0 and 1 (a new tensor;
    the shift is a CPU scalar, so no copy to the device)."""
    shift = torch.tensor(-amplifier / 2, dtype=p.dtype)
    return torch.add(shift, p, alpha=amplifier).sigmoid_()


class _AmplifiedSums(torch.autograd.Function):
    """Column sums [C] of the amplified predictions ``y~ = A(p)`` [N, C], ``S_c = sum_i y~_ic``
    and ``TP_c = sum_i y_ic y~_ic`` (``y`` the 0/1 targets, class ids [N] without their one-hot
    matrix), with ``p = softmax(z)`` (``softmax``) or ``sigmoid(z)``. Keeps ``p`` only (``y~`` is
    recomputed); the gradient in closed form, ``dL/dy~_ic = dL/dS_c + dL/dTP_c y_ic``,
    ``dy~/dp = L y~ (1 - y~)``, then through softmax ``p (g - sum_k g_k p_k)`` or sigmoid
    ``g p (1 - p)``, in one ``[N, C]`` tensor (on the CPU), each factor applied by ATen's fused
    sigmoid and softmax backward kernels."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor, amplifier: float,
                softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p = z.softmax(-1) if softmax else torch.sigmoid(z)
        y_hat = amplify(p, amplifier)
        s = y_hat.sum(0)
        if target.dim() == 1:
            tp = s.new_zeros(s.shape).index_add_(0, target, y_hat.gather(1, target[:, None]).squeeze(1))
        else:
            tp = y_hat.mul_(target).sum(0)
        ctx.amplifier, ctx.softmax = amplifier, softmax
        ctx.save_for_backward(p, target)
        return s, tp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s: torch.Tensor, g_tp: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, target = ctx.saved_tensors
        amp = ctx.amplifier
        g = amplify(p, amp)
        if target.dim() == 1:
            at_target = g.gather(1, target[:, None])
            at_target.sub_(at_target * at_target).mul_((amp * g_tp)[target][:, None])
            _sigmoid_backward(g_s.mul(amp)[None], g, into=g)  # amp g_s y~ (1 - y~)
            g.scatter_add_(1, target[:, None], at_target)
        else:
            _sigmoid_backward(torch.addcmul(g_s, target, g_tp).mul_(amp), g, into=g)
        if ctx.softmax and p.shape[1] < 16:  # the fused kernel's per-row tail dominates a short row
            g.sub_(torch.bmm(g[:, None, :], p[:, :, None]).view(-1, 1)).mul_(p)
        elif ctx.softmax:
            g = cls.softmax_backward_(g, p)
        else:
            _sigmoid_backward(g, p, into=g)  # g p (1 - p)
        return g, None, None, None


def _sigmoid_backward(grad: torch.Tensor, y: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """``grad * y * (1 - y)`` written into ``into`` in one pass (``grad`` broadcast)."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, y, grad_input=into)


def confusion(z: torch.Tensor, target: torch.Tensor, amplifier: float = 73.0,
              softmax: bool = True, gather: bool = False) -> tuple[torch.Tensor, ...]:
    """Soft ``(TP, FN, FP, TN)`` per class [C] of the amplified predictions of logits ``z``
    [N, C] against class ids [N] or 0/1 targets [N, C]: ``FN = count - TP``, ``FP = S - TP``,
    ``TN = N - count - S + TP`` from the column sums ``S`` and ``TP`` of
    :class:`_AmplifiedSums`; with ``gather`` those sums, the class counts and ``N`` are summed
    over the ranks (the gradient reaches every rank's logits, as :func:`gather_with_grad`)."""
    n, c = z.shape
    s, tp = _AmplifiedSums.apply(z, target, amplifier, softmax)
    if target.dim() == 1:
        count = z.new_zeros(c).index_add_(0, target, z.new_ones(n))
    else:
        count = target.sum(0)
    total = count.new_full((1,), n)
    if gather:
        s, tp = gather_with_grad(torch.stack([s, tp])[None]).sum(0)
        count, total = sum_over_ranks(torch.cat([count, total])).split([c, 1])
    fp = s - tp
    return tp, count - tp, fp, total - count - fp


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
            zf, target, softmax = cls.upcast(z), y[:, None].to(cls.compute_dtype(z)), False
        else:
            t = cls.targets("anyloss", z, y, multilabel=y.dim() == 2)
            zf, softmax = cls.upcast(z), t.ids is not None
            target = t.ids if softmax else t.dense.to(zf.dtype)
        counts = confusion(zf, target, self.amplifier, softmax, resolve_gather(self.gather))
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
