"""CW-BASS's confidence-weighted pseudo-labelling: on every unlabelled batch the teacher view's
no-gradient prediction gives each sample a pseudo-label and a confidence; samples above a dynamic
threshold (a sigmoid of the batch's mean confidence, clipped) are kept, and each kept sample's
cross-entropy is weighted by its confidence.

Tarubinga, Kalafatovich & Lee, "CW-BASS: Confidence-Weighted Boundary-Aware Learning for
Semi-Supervised Semantic Segmentation", IJCNN 2025 (arXiv:2502.15152); the rules and defaults
follow the authors' code (github.com/psychofict/CW-BASS, ``main.py``), per sample instead of per
pixel::

    c_i = max_k p_t(k | x_i),  y~_i = argmax_k p_t(k | x_i)        (teacher view, no gradient)
    tau = clip(tau_0 / (1 + exp(-beta (mean_i c_i - 0.5))), tau_min, tau_max)
    L_u = sum_i 1[c_i > tau] (delta c_i)^gamma CE(p_s(x_i), y~_i) / max(1, sum_i 1[c_i > tau])

with ``tau_0 = 0.6``, ``beta = 0.5``, ``[tau_min, tau_max] = [0.3, 0.8]``, ``gamma = 1`` and the
confidence-decay factor ``delta`` (1: off, the code's default; the code's factor when on is 0.9).
The normaliser is the number of kept samples, not the sum of their weights.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import distributed, keys
from sdk.card import Card
from sdk.classification import upcast
from sdk.errors import ConfigError, RequirementError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.semisup import pseudo_labels, unlabeled_views
from sdk.types import Loss

OWNER = "cw_bass_confidence_weighting"


def dynamic_threshold(confidence: Tensor, base: float, beta: float, tau_min: float,
                      tau_max: float) -> Tensor:
    """``clip(base / (1 + exp(-beta (mean(c) - 0.5))), tau_min, tau_max)`` (a 0-d tensor)."""
    raw = base * torch.sigmoid(beta * (confidence.mean() - 0.5))
    return raw.clamp(tau_min, tau_max)


def confidence_weighted_loss(logits: Tensor, labels: Tensor, confidence: Tensor, keep: Tensor,
                             gamma: float) -> Tensor:
    """``sum_i keep_i c_i^gamma CE(logits_i, y~_i) / max(1, sum_i keep_i)``."""
    ce = F.cross_entropy(upcast(logits), labels, reduction="none")
    k = keep.to(ce.dtype)
    return (confidence.to(ce.dtype) ** gamma * ce * k).sum() / k.sum().clamp_min(1)


class CWBASSConfidenceWeighting(Callback):
    """Adds ``weight * L_u`` (the module docstring) of the step's unlabelled batch to every
    training loss (``after_loss``); needs ``fit(..., unlabeled=loader)``. The pseudo-labels,
    confidences and threshold come from view ``teacher_view`` without gradient, the loss from
    view ``student_view`` (``None``: the last view, the strong one). The threshold uses the
    mean confidence of the global batch (all ranks). Stateless: nothing to checkpoint."""

    reads_unlabeled = True

    def __init__(self, weight: Annotated[float, Ge(0)] = 1.0,
                 gamma: Annotated[float, Ge(0)] = 1.0,
                 base_threshold: Annotated[float, Interval(gt=0, le=2)] = 0.6,
                 beta: Annotated[float, Ge(0)] = 0.5,
                 tau_min: Annotated[float, Interval(ge=0, le=1)] = 0.3,
                 tau_max: Annotated[float, Interval(ge=0, le=1)] = 0.8,
                 decay: Annotated[float, Interval(gt=0, le=1)] = 1.0,
                 teacher_view: Annotated[int, Ge(0)] = 0,
                 student_view: Annotated[int, Ge(0)] | None = None):
        if tau_min > tau_max:
            raise ConfigError(f"{OWNER}: tau_min={tau_min} exceeds tau_max={tau_max}",
                              param="tau_min")
        self.weight, self.gamma, self.decay = weight, gamma, decay
        self.base_threshold, self.beta, self.tau_min, self.tau_max = base_threshold, beta, tau_min, tau_max
        self.teacher_view, self.student_view = teacher_view, student_view

    def on_fit_start(self, state: Any) -> None:
        if state.trainer.unlabeled_loader is None:
            raise RequirementError(f"callback {OWNER!r} pseudo-labels unlabelled data: pass "
                                   "fit(..., unlabeled=loader)")

    def after_loss(self, state: Any) -> None:
        views = unlabeled_views(OWNER, state.views, n_views=1)
        if views is None:
            raise RequirementError(f"callback {OWNER!r} needs extras[{keys.UNLABELED!r}] "
                                   "(fit(..., unlabeled=loader)), got none")
        student = len(views) - 1 if self.student_view is None else self.student_view
        for name, v in (("teacher_view", self.teacher_view), ("student_view", student)):
            if v >= len(views):
                raise RequirementError(f"callback {OWNER!r}: {name}={v}, but extras"
                                       f"[{keys.UNLABELED!r}] holds {len(views)} views")
        conf, labels = pseudo_labels(views[self.teacher_view])
        tau = dynamic_threshold(distributed.gather_no_grad(conf), self.base_threshold, self.beta,
                                self.tau_min, self.tau_max)
        keep = conf > tau
        term = confidence_weighted_loss(views[student], labels, self.decay * conf, keep, self.gamma)
        loss = state.loss
        logs = {OWNER: term.detach(), "threshold": tau, "pseudo_labelled": keep.float().mean()}
        state.loss = Loss(value=loss.value + self.weight * term, per_sample=loss.per_sample,
                          logs={**loss.logs, **logs})


CARD = Card(
    name="cw_bass_confidence_weighting", kind="callback",
    title="CW-BASS: Confidence-Weighted Boundary-Aware Learning for Semi-Supervised Semantic "
          "Segmentation",
    paper="arXiv:2502.15152",
    summary="Online pseudo-labels from the teacher view; samples above a dynamic threshold (a "
            "clipped sigmoid of the batch's mean confidence) are kept and their cross-entropy "
            "is weighted by their confidence, averaged over the kept samples.",
    formula="L = L_objective + lambda L_u; L_u = sum_i 1[c_i > tau] (delta c_i)^gamma CE(p_s(x_i), "
            "y~_i) / max(1, #kept); tau = clip(tau_0 sigmoid(beta (mean c - 0.5)), tau_min, "
            "tau_max); defaults tau_0 = 0.6, beta = 0.5, [tau_min, tau_max] = [0.3, 0.8], gamma "
            "= 1, delta = 1 (decay off; 0.9 when on), lambda = 1",
    left_out="The rules and defaults follow the authors' code (psychofict/CW-BASS main.py); the "
             "paper's own equations were not available to us. Not here: the boundary-aware term "
             "(an extra 0.5-weighted cross-entropy on Sobel edges of the pseudo-label map), "
             "which needs pixel maps; the code's mean teacher (EMA 0.999) - the pseudo-labels "
             "come from the model's own no-gradient prediction on the teacher view; the code's "
             "linear warm-up of lambda over its first 5 epochs; DeepLabV3+ and the "
             "segmentation datasets. One pseudo-label per sample, not per pixel.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CWBASSConfidenceWeighting, card=CARD)
