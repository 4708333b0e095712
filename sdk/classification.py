"""What classification losses share: targets, reductions, stable log-probabilities, distillation.

* **Targets** (:func:`targets`): ``Batch.targets`` as class ids ``[B]``, soft labels ``[B, C]``
  (rows sum to 1) or multi-label sets ``[B, C]`` (entries in ``[0, 1]``), checked against the
  logits with a :class:`sdk.ShapeError` naming the plugin and the field. Values (an id out of
  range, a soft label that does not sum to 1) are read on CPU tensors only, where reading
  costs no device sync; on an accelerator an id out of range asserts on the device.
* **Unknown-class rows** (:data:`UNKNOWN`): the class id ``-1`` marks a row whose class is
  unknown (an unlabelled row of semi-supervised learning, an outlier of a class outside the
  label set). Only an objective declaring ``accepts_unknown = True`` takes it (``targets(...,
  unknown=True)``: those rows carry ``valid`` False, like ``ignore_index``, and the objective
  uses them in its unlabelled terms); every other objective refuses ``-1`` with a
  :class:`sdk.ShapeError` naming the plugin, ``Batch.targets`` and this convention. The
  conformance kit fuzzes batches with unknown rows only for objectives that accept them.
* **Reductions** (:func:`reduce`): ``ignore_index`` (those samples give 0 and leave the mean)
  and per-class weights, as :func:`torch.nn.functional.cross_entropy` reduces them:
  ``value = sum_i w_{y_i} l_i / sum_i w_{y_i}``; ``Loss.per_sample`` is ``w_{y_i} l_i`` (0 for
  an ignored sample), for reweighters.
* **Numerics** (:func:`log_probs`, :func:`target_log_prob`): half-precision logits (bf16
  autocast) are upcast to float32 before the log-softmax; float64 stays float64. Losses of id
  targets that need only ``log p_y`` take it from torch's fused cross-entropy.
* **Distillation** (:func:`teacher_logits`, :func:`distillation_kl`): a teacher's logits are
  ``Views.extras[keys.TEACHER][0]``, the output of an encoding :class:`sdk.interfaces.Teacher`
  on the first view (the view whose output are the logits): the ``ema`` teacher or a
  :class:`FrozenTeacher` around a trained model; ``T^2 KL(softmax(t/T) || softmax(z/T))``
  (Hinton et al. 2015, arXiv:1503.02531).
* **Decoupled softmax** (:func:`decoupled_log_probs`): each positive class against the
  negatives only (multi-label retrieval, mixed classes of a mixup).
* **In-place softmax kernels** (:func:`log_softmax_`, :func:`softmax_backward_`): ATen's fused
  log-softmax and softmax backward written into their input on the CPU (one ``[B, C]`` buffer
  fewer in the closed-form gradients of ``anyloss`` and ``ldr_kl_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor, nn

from sdk import keys
from sdk.errors import ConfigError, ShapeError
from sdk.interfaces import Teacher
from sdk.types import Loss, Views, check_ids

Kind = Literal["ids", "soft", "multilabel"]

UNKNOWN = -1
"""The ``Batch.targets`` class id of a row whose class is unknown (unlabelled, or an outlier of
an unknown class); taken only by objectives declaring ``accepts_unknown``."""


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision tensors (bf16, fp16), the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` in :func:`compute_dtype` (a no-op for float32 and float64)."""
    return t.to(compute_dtype(t))


def log_probs(logits: Tensor) -> Tensor:
    """``log softmax(logits)`` over the last dimension, computed in float32 or better."""
    return upcast(logits).log_softmax(-1)


@attrs.frozen
class Targets:
    """Checked targets of ``B`` samples over ``C`` classes.

    ``kind``: ``"ids"`` (``ids`` [B] long; ignored samples carry id 0 and ``valid`` False),
    ``"soft"`` or ``"multilabel"`` (``dense`` [B, C] in the compute dtype of the logits).
    """

    kind: Kind
    ids: Tensor | None = None
    dense: Tensor | None = None
    valid: Tensor | None = None

    def one_hot(self, num_classes: int, dtype: torch.dtype) -> Tensor:
        """The targets as ``[B, C]`` (one-hot rows for ids)."""
        if self.dense is not None:
            return self.dense.to(dtype)
        return torch.nn.functional.one_hot(self.ids, num_classes).to(dtype)


def _tolerance(dtype: torch.dtype) -> float:
    # each entry rounded with relative error eps/2: a row of non-negative entries sums within eps
    return max(2 * torch.finfo(dtype).eps, 1e-5)


def targets(owner: str, logits: Tensor, target: Tensor, *, soft: bool = True,
            multilabel: bool = False, ignore_index: int | None = None,
            unknown: bool = False) -> Targets:
    """Check ``target`` against ``logits`` [B, C] and return it as :class:`Targets`.

    ``soft``: whether ``[B, C]`` probability rows are accepted; ``multilabel``: whether
    ``[B, C]`` is read as multi-label sets (entries in ``[0, 1]``, any row sum) instead.
    ``ignore_index``: the id of samples that do not count (ids only). ``unknown``: whether
    :data:`UNKNOWN` rows are taken (ids only; they carry ``valid`` False); without it a ``-1``
    is refused with a message naming the convention.
    """
    b, c = logits.shape
    if target.dim() == 1:
        check_ids(owner, "Batch.targets", target)
        ids, valid = target.long(), None
        skip = [v for v in (ignore_index, UNKNOWN if unknown else None) if v is not None]
        for value in skip:
            valid = ids != value if valid is None else valid & (ids != value)
        if valid is not None:
            ids = ids.masked_fill(~valid, 0)
        if ids.device.type == "cpu":
            _check_class_ids(owner, target.long() if valid is None else target.long()[valid], c)
        return Targets("ids", ids=ids, valid=valid)
    if not (soft or multilabel):
        raise ShapeError(f"{owner}: Batch.targets must be class ids [{b}], got {target.dtype} "
                         f"{list(target.shape)}")
    what = "multi-label sets" if multilabel else "soft labels"
    if target.shape != logits.shape:
        raise ShapeError(f"{owner}: Batch.targets must be class ids [B] or {what} "
                         f"{list(logits.shape)} matching the logits, got {list(target.shape)}")
    if not (target.is_floating_point() or target.dtype == torch.bool or multilabel):
        raise ShapeError(f"{owner}: Batch.targets as soft labels must be floating point, got {target.dtype}")
    if ignore_index is not None:
        raise ConfigError(f"{owner}: ignore_index applies to class-id targets, got {what} "
                          f"{list(target.shape)}")
    dense = target.to(compute_dtype(logits))
    if target.device.type == "cpu" and target.numel():
        low, high = (float(v) for v in torch.aminmax(dense))
        if low < 0 or high > 1:
            raise ShapeError(f"{owner}: Batch.targets as {what} must lie in [0, 1], got values in "
                             f"[{low:.4g}, {high:.4g}]")
        if not multilabel:
            sums = target.double().sum(-1)
            worst = float((sums - 1).abs().max())
            if worst > _tolerance(target.dtype if target.is_floating_point() else torch.float32):
                raise ShapeError(f"{owner}: Batch.targets as soft labels must sum to 1 per row, got "
                                 f"row sums in [{float(sums.min()):.6g}, {float(sums.max()):.6g}]")
    return Targets("multilabel" if multilabel else "soft", dense=dense)


def _check_class_ids(owner: str, ids: Tensor, num_classes: int) -> None:
    try:
        check_ids(owner, "Batch.targets", ids, num_classes)
    except ShapeError as exc:
        if bool((ids == UNKNOWN).any()):
            raise ShapeError(f"{exc}; {UNKNOWN} marks a row of unknown class "
                             "(sdk.classification.UNKNOWN), which only objectives declaring "
                             "accepts_unknown take") from None
        raise


def target_log_prob(logits: Tensor, t: Targets) -> Tensor:
    """``log softmax(z)_y`` [B] for id targets (torch's fused cross-entropy kernels: no ``[B, C]``
    log-probabilities kept beyond theirs), ``sum_c q_c log softmax(z)_c`` for dense ones."""
    z = upcast(logits)
    if t.ids is not None:
        return -torch.nn.functional.cross_entropy(z, t.ids, reduction="none")
    return (t.dense.to(z.dtype) * z.log_softmax(-1)).sum(-1)


def pick(values: Tensor, t: Targets) -> Tensor:
    """``values[i, y_i]`` for id targets, ``sum_c q_ic values[i, c]`` for dense ones: [B]."""
    if t.ids is not None:
        return values.gather(-1, t.ids[:, None]).squeeze(-1)
    return (t.dense.to(values.dtype) * values).sum(-1)


def class_weights(owner: str, weights: Tensor | None, num_classes: int) -> None:
    """Raise :class:`sdk.ShapeError` unless ``weights`` (when given) has one entry per class."""
    if weights is not None and weights.shape != (num_classes,):
        raise ShapeError(f"{owner}: class_weights has {weights.shape[0]} entries, but the logits "
                         f"have {num_classes} classes")


def reduce(per_sample: Tensor, t: Targets, weights: Tensor | None = None) -> Loss:
    """The :class:`sdk.Loss` of per-sample losses ``l`` [B]: ``per_sample = w_i l_i`` and
    ``value = sum_i w_i l_i / sum_i w_i``, ``w_i`` the class weight of ``y_i`` (1 without
    weights), 0 for ignored samples; soft and multi-label targets average over the batch
    (their class weights act inside ``l``). A batch whose samples are all ignored gives 0."""
    if t.ids is None:
        return Loss(value=per_sample.mean(), per_sample=per_sample)
    w = None if weights is None else weights.to(per_sample.dtype)[t.ids]
    if t.valid is not None:
        w = t.valid.to(per_sample.dtype) if w is None else w * t.valid
    if w is None:
        return Loss(value=per_sample.mean(), per_sample=per_sample)
    per_sample = torch.where(w != 0, per_sample * w, 0.0)  # an ignored sample's inf/NaN stays out
    return Loss(value=per_sample.sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny),
                per_sample=per_sample)


def weight_buffer(owner: str, values: Sequence[float] | None) -> Tensor | None:
    """Per-class weights from a recipe's list as a float tensor (a buffer of the objective);
    :class:`sdk.ConfigError` unless they are non-negative with a positive sum."""
    if values is None:
        return None
    w = torch.tensor([float(v) for v in values])
    if not len(w) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ConfigError(f"{owner}: class_weights must be non-negative with a positive sum, "
                          f"got {list(values)}")
    return w


def teacher_logits(owner: str, views: Views) -> Tensor:
    """The teacher's logits on the first view, ``Views.extras[keys.TEACHER][0]`` (detached),
    checked to match ``Views.logits``."""
    entry = views.extras[keys.TEACHER]
    t = entry[0] if isinstance(entry, (tuple, list)) else entry
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ShapeError(f"{owner}: Views.extras[{keys.TEACHER!r}] must hold floating teacher logits, "
                         f"got {type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
    if t.shape != views.logits.shape:
        raise ShapeError(f"{owner}: Views.extras[{keys.TEACHER!r}] (teacher logits) has shape "
                         f"{list(t.shape)}, but Views.logits has {list(views.logits.shape)}")
    return t.detach()


def distillation_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T^2 KL(softmax(t/T) || softmax(z/T))`` [B] (Hinton et al. 2015: the ``T^2``
    keeps the soft term's gradient scale independent of ``T``)."""
    log_s = log_probs(student / temperature)
    log_t = log_probs(teacher.to(log_s.dtype) / temperature)
    return temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1)


class FrozenTeacher(Teacher):
    """A fixed, trained model as a teacher: ``teacher(x) = model(x)`` without gradients; it is
    never updated (distillation from a pretrained network)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.model.eval()  # a frozen teacher's dropout and batch statistics stay off
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def update(self, *, student=None, views=None, batch=None, step: int = 0,
               max_steps: int | None = None) -> None:
        """A frozen teacher does not change."""


def decoupled_log_probs(scores: Tensor, positive: Tensor) -> Tensor:
    """``log(e^{s_k} / (e^{s_k} + sum_{j not in P} e^{s_j}))`` [B, C] for the classes ``k`` in
    ``positive`` [B, C] (booleans; 0 elsewhere): each positive competes with the negatives only,
    not with the other positives (DEXML's DecoupledSoftmax, ``decoupled_softmax_xmc``; the
    decoupled regulariser of ``decoupled_mixup``). Computed in float32 or better."""
    s = upcast(scores)
    negatives = torch.logsumexp(s.masked_fill(positive, torch.finfo(s.dtype).min), -1, keepdim=True)
    return torch.where(positive, s - torch.logaddexp(negatives, s), 0.0)


def log_softmax_(x: Tensor) -> Tensor:
    """``log_softmax(x, -1)`` written into ``x`` on the CPU, where ATen's kernel reads each row
    (its max and sum) before writing it (bit-equal to the out-of-place result; no second
    ``[B, C]`` buffer); a new tensor on other devices."""
    if x.device.type != "cpu":
        return torch.log_softmax(x, -1)
    return torch.ops.aten._log_softmax.out(x, -1, False, out=x)


def softmax_backward_(grad: Tensor, p: Tensor) -> Tensor:
    """``p (grad - sum_k grad_k p_k)`` over the last dim (the softmax's backward, ``p`` its
    output) in ATen's fused kernel, written into ``grad`` on the CPU as :func:`log_softmax_`;
    a new tensor on other devices."""
    if grad.device.type != "cpu":
        return torch._softmax_backward_data(grad, p, p.dim() - 1, p.dtype)
    return torch.ops.aten._softmax_backward_data.out(grad, p, p.dim() - 1, p.dtype, grad_input=grad)
