"""Cross-entropy with label smoothing.

Label smoothing: Szegedy et al., "Rethinking the Inception Architecture for Computer Vision",
CVPR 2016.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Interval

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor,
                       label_smoothing: float = 0.0, reduction: str = "none") -> torch.Tensor:
    """Per-sample ``-sum_c q_c log softmax(logits)_c``, ``q = (1 - e) y + e / C`` (their mean
    with ``reduction="mean"``, in torch's fused kernel).

    ``targets`` are class ids [B] or probabilities [B, C] (soft labels, e.g. from mixup);
    anything else raises :class:`sdk.ShapeError`, as do ids out of range on CPU (found when
    torch fails on them, so the hot path reads no values; on CUDA the device asserts).
    """
    if targets.dim() == 1:
        check_ids("cross_entropy", "targets", targets)
    elif targets.shape != logits.shape:
        raise ShapeError(f"cross_entropy: targets must be class ids [B] or soft labels "
                         f"{list(logits.shape)} matching the logits, got {list(targets.shape)}")
    if targets.dim() == 2:
        targets = targets.to(logits.dtype)
    try:
        return F.cross_entropy(logits.float(), targets if targets.dim() == 1 else targets.float(),
                               label_smoothing=label_smoothing, reduction=reduction)
    except (IndexError, RuntimeError):  # ids out of range (on CPU; CUDA asserts on the device)
        check_ids("cross_entropy", "targets", targets, logits.shape[1])
        raise


class CrossEntropy(Objective):
    """Mean cross-entropy of ``Views.logits`` against ``Batch.targets`` (ids or soft labels)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def caveats(self) -> dict[Input, str]:
        if not self.label_smoothing:
            return {}
        return {Input.SOFT_LABELS: f"label_smoothing={self.label_smoothing} smooths targets that "
                "are already mixed: the smoothing adds to mixup's own softening"}

    def forward(self, views: Views, batch: Batch) -> Loss:
        if not self.per_sample_requested:
            return Loss(value=cross_entropy_loss(views.logits, batch.targets, self.label_smoothing,
                                                 reduction="mean"))
        per_sample = cross_entropy_loss(views.logits, batch.targets, self.label_smoothing)
        return Loss(value=per_sample.mean(), per_sample=per_sample)


CARD = Card(
    name="cross_entropy", kind="objective",
    title="Rethinking the Inception Architecture for Computer Vision (label smoothing)",
    paper="arXiv:1512.00567",
    summary="Softmax cross-entropy on logits, with optional label smoothing and soft targets.",
    formula="l_i = -sum_c q_ic log softmax(z_i)_c, q_i = (1 - eps) y_i + eps / C",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CrossEntropy, card=CARD)
