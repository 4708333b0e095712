"""Focal loss: cross-entropy scaled by ``(1 - p_t)^gamma``, which down-weights easy samples.

Lin, Goyal, Girshick, He & Dollár, "Focal Loss for Dense Object Detection", ICCV 2017
(arXiv:1708.02002), eq. 5; gamma = 2, alpha = 0.25 for the sigmoid form (Sec. 5.1).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval

from sdk import classification as cls
from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def _modulator(one_minus_p: torch.Tensor, gamma: float) -> torch.Tensor:
    # (1 - p)^gamma; clamped away from 0 so that gamma < 1 keeps a finite gradient at p = 1
    return one_minus_p.clamp_min(torch.finfo(one_minus_p.dtype).tiny) ** gamma


def softmax_focal(logits: torch.Tensor, t: cls.Targets, gamma: float,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``-sum_c q_c (1 - p_c)^gamma log p_c``, ``p = softmax(z)`` (ids: ``q`` one-hot;
    soft labels with class ``weights``: ``w_c q_c``; ids are weighted in the reduction)."""
    if t.ids is not None:  # only log p_y is needed
        logp_y = cls.target_log_prob(logits, t)
        return -_modulator(-torch.expm1(logp_y), gamma) * logp_y
    logp = cls.log_probs(logits)
    focal = _modulator(-torch.expm1(logp), gamma) * logp
    if weights is not None and t.ids is None:
        focal = focal * weights.to(focal.dtype)
    return -cls.pick(focal, t)


def sigmoid_focal(logits: torch.Tensor, y: torch.Tensor, gamma: float,
                  alpha: float | None) -> torch.Tensor:
    """Per-sample ``sum_c -alpha_t (1 - p_t)^gamma log p_t`` with ``p = sigmoid(z)`` per class,
    ``p_t = p`` where ``y = 1`` and ``1 - p`` where ``y = 0``, ``alpha_t = alpha`` / ``1 - alpha``
    (eq. 5; 1 without alpha)."""
    z = cls.upcast(logits)
    y = y.to(z.dtype)
    ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    one_minus_pt = y * torch.sigmoid(-z) + (1 - y) * torch.sigmoid(z)
    loss = _modulator(one_minus_pt, gamma) * ce
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.sum(-1)


class FocalLoss(Objective):
    """Focal loss on ``Views.logits``: softmax over classes (ids or soft labels), or, with
    ``sigmoid=True``, the paper's per-class sigmoid form (ids or multi-label sets [B, C]),
    summed over classes per sample."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, gamma: Annotated[float, Ge(0)] = 2.0,
                 alpha: Annotated[float | None, Interval(ge=0, le=1)] = None,
                 sigmoid: bool = False, class_weights: tuple[float, ...] | None = None,
                 ignore_index: int | None = None):
        super().__init__()
        if alpha is not None and not sigmoid:
            raise ConfigError("focal_loss: alpha weighs positives against negatives of the sigmoid "
                              "form (sigmoid=True); for the softmax form give class_weights")
        if class_weights is not None and sigmoid:
            raise ConfigError("focal_loss: class_weights weigh the softmax form; the sigmoid form "
                              "is balanced by alpha")
        self.gamma, self.alpha, self.sigmoid, self.ignore_index = gamma, alpha, sigmoid, ignore_index
        self.register_buffer("class_weights", cls.weight_buffer("focal_loss", class_weights))

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        cls.class_weights("focal_loss", self.class_weights, z.shape[1])
        t = cls.targets("focal_loss", z, batch.targets, multilabel=self.sigmoid,
                        ignore_index=self.ignore_index)
        if self.sigmoid:
            per_sample = sigmoid_focal(z, t.one_hot(z.shape[1], cls.compute_dtype(z)), self.gamma,
                                       self.alpha)
        else:
            per_sample = softmax_focal(z, t, self.gamma, self.class_weights)
        return cls.reduce(per_sample, t, self.class_weights)


CARD = Card(
    name="focal_loss", kind="objective", title="Focal Loss for Dense Object Detection",
    paper="arXiv:1708.02002",
    summary="Cross-entropy down-weighted on well-classified samples by (1 - p_t)^gamma; "
            "softmax over classes, or the paper's per-class sigmoid form with alpha balancing.",
    formula="FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t; softmax: l_i = -sum_c q_ic (1 - p_ic)^gamma "
            "log p_ic; sigmoid: l_i = sum_c FL(p_t,ic)",
    left_out="RetinaNet's normalisation by the number of anchors assigned to objects and its "
             "prior-probability bias initialisation (a model's concern): samples are averaged "
             "(weighted by class_weights), classes summed in the sigmoid form. alpha applies to "
             "the sigmoid form only, class_weights (as in cross_entropy) to the softmax form.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FocalLoss, card=CARD)
