"""Cross-entropy with label smoothing.

Label smoothing: Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
CVPR 2016.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Interval

from sdk import classification as cls
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                       weight: torch.Tensor | None = None,
                       ignore_index: int | None = None, reduction: str = "none") -> torch.Tensor:
    """Per-sample ``-sum_c w_c q_c log softmax(logits)_c``, ``q = (1 - e) y + e / C`` (``w``: class
    weights, 1 without; an id target's sample is weighted ``w_y``, an ignored one gives 0);
    ``reduction="mean"``: their weighted mean, in torch's fused kernel.

    ``targets`` are class ids [B] of any integer dtype or probabilities [B, C] (soft labels,
    e.g. from mixup), checked by :func:`sdk.classification.targets` (soft labels' values on
    CPU). int64 ids go to torch's kernel unchecked: ids of another rank, shape or range make it
    fail, and only then are they checked, to say why (on CUDA the device asserts), so the hot
    path reads no values and calls no check.
    """
    if targets.dtype is not torch.int64:
        if targets.dim() == 1:
            check_ids("cross_entropy", "targets", targets)
            targets = targets.long()
        else:
            cls.targets("cross_entropy", logits, targets)
            targets = targets.float()
    try:
        logits = logits if logits.dtype is torch.float32 else logits.float()
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing,
                               ignore_index=-100 if ignore_index is None else ignore_index,
                               reduction=reduction)
    except (IndexError, RuntimeError):  # ids out of range (on CPU; CUDA asserts on the device)
        cls.targets("cross_entropy", logits, targets, ignore_index=ignore_index)
        raise


class CrossEntropy(Objective):
    """Cross-entropy of ``Views.logits`` against ``Batch.targets`` (ids or soft labels), reduced
    as :func:`sdk.classification.reduce` (class weights, ignored ids)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0,
                 class_weights: tuple[float, ...] | None = None, ignore_index: int | None = None):
        super().__init__()
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index
        self.register_buffer("class_weights", cls.weight_buffer("cross_entropy", class_weights))
        self._weighted = class_weights is not None  # read the buffer only when there is one

    def caveats(self) -> dict[Input, str]:
        if not self.label_smoothing:
            return {}
        return {Input.SOFT_LABELS: f"label_smoothing={self.label_smoothing} smooths targets that "
                "are already mixed: the smoothing adds to mixup's own softening"}

    def forward(self, views: Views, batch: Batch) -> Loss:
        w = None
        if self._weighted:
            w = self.class_weights
            cls.class_weights("cross_entropy", w, views.logits.shape[1])
        if not self.per_sample_requested:  # torch's fused mean reduces the same way
            return Loss(value=cross_entropy_loss(views.logits, batch.targets, self.label_smoothing,
                                                 w, self.ignore_index, reduction="mean"))
        per_sample = cross_entropy_loss(views.logits, batch.targets, self.label_smoothing, w,
                                        self.ignore_index)
        if batch.targets.dim() == 2 or (w is None and self.ignore_index is None):
            return Loss(value=per_sample.mean(), per_sample=per_sample)
        y = batch.targets.long()
        count = (torch.ones_like(per_sample) if w is None else w[y.clamp(0, len(w) - 1)])
        if self.ignore_index is not None:
            count = count * (y != self.ignore_index)
        return Loss(value=per_sample.sum() / count.sum().clamp_min(torch.finfo(count.dtype).tiny),
                    per_sample=per_sample)


CARD = Card(
    name="cross_entropy", kind="objective",
    title="Rethinking the Inception Architecture for Computer Vision (label smoothing)",
    paper="arXiv:1512.00567",
    summary="Softmax cross-entropy on logits, with optional label smoothing and soft targets.",
    formula="l_i = -sum_c w_c q_ic log softmax(z_i)_c, q_i = (1 - eps) y_i + eps / C; "
            "L = sum_i l_i / sum_i w_{y_i} (ids; ignored ids count 0), mean over i (soft labels)",
    left_out="Class weights and ignore_index follow torch.nn.functional.cross_entropy; the paper "
             "has neither.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CrossEntropy, card=CARD)
