"""CW-BASS's confidence-weighted pseudo-labelling: every unlabelled sample keeps a pseudo-label
and its confidence; the unlabelled loss weights each sample by that confidence where it reaches
a dynamic threshold (a running average of the model's confidence, clipped), and a stored
confidence that the model does not re-confirm decays every epoch.

Tarubinga, Kalafatovich & Lee, "CW-BASS: Confidence-Weighted Boundary-Aware Learning for
Semi-Supervised Semantic Segmentation", IJCNN 2025 (arXiv:2502.15152): the confidence-weighted
loss, the dynamic threshold and the confidence decay, per sample instead of per pixel.
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
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.semisup import pseudo_labels, unlabeled_index, unlabeled_views
from sdk.types import Loss

OWNER = "cw_bass_confidence_weighting"


def confidence_weights(confidence: Tensor, labels: Tensor, threshold: Tensor | float) -> Tensor:
    """``w_i = c_i 1[c_i >= tau] 1[y~_i != none]`` (``labels`` ``-1``: no pseudo-label)."""
    return torch.where((confidence >= threshold) & (labels >= 0), confidence, 0.0)


def confidence_weighted_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """``sum_i w_i CE(logits_i, y~_i) / sum_i w_i`` (0 when every weight is 0)."""
    ce = F.cross_entropy(upcast(logits), labels.clamp_min(0), reduction="none")
    w = weights.to(ce.dtype)
    return (w * ce).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


class CWBASSConfidenceWeighting(Callback):
    """Adds ``weight * confidence_weighted_loss`` of the unlabelled batch to every training loss
    (``after_loss``); needs ``fit(..., unlabeled=loader)`` with items ``(x, y, index)``.

    Per unlabelled sample (keyed by ``extras[keys.UNLABELED_INDEX]``) a pseudo-label ``y~`` and
    confidence ``c``. On each training batch, from the no-gradient prediction of view
    ``teacher_view`` (confidence ``c'``, label ``y'``): an unlabelled sample takes ``(y', c')``
    when it has no label yet, when ``y' = y~`` (re-confirmed: ``c <- max(c, c')``) or when
    ``c' > c``; such a sample counts as confirmed this epoch. The loss of view ``student_view``
    (``None``: the last view, the strong one) then uses the stored ``(y~, c)`` and the current
    threshold ``tau``, after which ``tau <- clip(m tau + (1 - m) mean(c'), tau_min, tau_max)``
    (the mean over the global batch). At every epoch end the confidence of each stored label
    that was not confirmed during the epoch is multiplied by ``decay``. All state is
    checkpointed and all-gathered over the ranks by index."""

    reads_unlabeled = True

    def __init__(self, weight: Annotated[float, Ge(0)] = 1.0,
                 momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.99,
                 initial_threshold: Annotated[float, Interval(ge=0, le=1)] = 0.95,
                 tau_min: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 tau_max: Annotated[float, Interval(ge=0, le=1)] = 0.95,
                 decay: Annotated[float, Interval(gt=0, le=1)] = 0.99,
                 teacher_view: Annotated[int, Ge(0)] = 0,
                 student_view: Annotated[int, Ge(0)] | None = None,
                 num_samples: Annotated[int | None, Ge(1)] = None):
        if tau_min > tau_max:
            raise ConfigError(f"{OWNER}: tau_min={tau_min} exceeds tau_max={tau_max}",
                              param="tau_min")
        self.weight, self.momentum, self.decay = weight, momentum, decay
        self.initial_threshold, self.tau_min, self.tau_max = initial_threshold, tau_min, tau_max
        self.teacher_view, self.student_view, self.num_samples = teacher_view, student_view, num_samples
        self.labels: Tensor | None = None
        self.confidence: Tensor | None = None
        self.confirmed: Tensor | None = None
        self.threshold = torch.tensor(min(max(initial_threshold, tau_min), tau_max))

    def reset(self, n: int, device: torch.device | str = "cpu") -> None:
        """State for ``n`` unlabelled samples: no pseudo-labels, the initial threshold."""
        self.labels = torch.full((n,), -1, dtype=torch.long, device=device)
        self.confidence = torch.zeros(n, device=device)
        self.confirmed = torch.zeros(n, dtype=torch.bool, device=device)
        self.threshold = self.threshold.to(device)

    def on_fit_start(self, state: Any) -> None:
        trainer = state.trainer
        loader = trainer.unlabeled_loader
        if loader is None:
            raise RequirementError(f"callback {OWNER!r} pseudo-labels unlabelled data: pass "
                                   "fit(..., unlabeled=loader)")
        n = self.num_samples
        if n is None:
            dataset = getattr(loader, "dataset", None)
            if dataset is None:
                raise RequirementError(f"callback {OWNER!r}: give num_samples (the unlabelled "
                                       "loader has no dataset to size it from)")
            n = len(dataset)
        if self.labels is None or self.labels.numel() != n:
            self.reset(n, trainer.device)

    @torch.no_grad()
    def observe(self, index: Tensor, logits: Tensor) -> Tensor:
        """Record one unlabelled batch's prediction (the rule above); returns ``c'`` ``[U]``."""
        conf, pred = pseudo_labels(logits)
        every_index = distributed.gather_no_grad(index)
        conf_all, pred_all = distributed.gather_no_grad(conf.float()), distributed.gather_no_grad(pred)
        old_label, old_conf = self.labels[every_index], self.confidence[every_index]
        same = pred_all == old_label
        take = (old_label < 0) | same | (conf_all > old_conf)
        new_conf = torch.where(same, torch.maximum(old_conf, conf_all), conf_all)
        self.labels[every_index] = torch.where(take, pred_all, old_label)
        self.confidence[every_index] = torch.where(take, new_conf, old_conf)
        self.confirmed[every_index] |= take
        return conf_all

    def after_loss(self, state: Any) -> None:
        if self.labels is None:
            raise RequirementError(f"callback {OWNER!r} has no state: it sizes itself at fit start "
                                   "(or call reset(num_samples))")
        views = unlabeled_views(OWNER, state.views, n_views=1)
        if views is None:
            raise RequirementError(f"callback {OWNER!r} needs extras[{keys.UNLABELED!r}] "
                                   "(fit(..., unlabeled=loader)), got none")
        student = len(views) - 1 if self.student_view is None else self.student_view
        for name, v in (("teacher_view", self.teacher_view), ("student_view", student)):
            if v >= len(views):
                raise RequirementError(f"callback {OWNER!r}: {name}={v}, but extras"
                                       f"[{keys.UNLABELED!r}] holds {len(views)} views")
        index = unlabeled_index(OWNER, state.views, views[0].shape[0])
        seen = self.observe(index, views[self.teacher_view])
        w = confidence_weights(self.confidence[index], self.labels[index], self.threshold)
        term = confidence_weighted_loss(views[student], self.labels[index], w)
        logs = {OWNER: term.detach(), "threshold": self.threshold.clone(),
                "pseudo_labelled": (w > 0).float().mean()}
        with torch.no_grad():
            tau = self.momentum * self.threshold + (1 - self.momentum) * seen.mean()
            self.threshold = tau.clamp(self.tau_min, self.tau_max)
        loss = state.loss
        state.loss = Loss(value=loss.value + self.weight * term, per_sample=loss.per_sample,
                          logs={**loss.logs, **logs})

    def on_epoch_end(self, state: Any) -> None:
        self.decay_unconfirmed()

    @torch.no_grad()
    def decay_unconfirmed(self) -> None:
        """``c <- decay * c`` for stored labels not confirmed since the last call; clears the
        confirmations."""
        stale = (self.labels >= 0) & ~self.confirmed
        self.confidence = torch.where(stale, self.decay * self.confidence, self.confidence)
        self.confirmed.zero_()

    def state_dict(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        return {"labels": self.labels.cpu(), "confidence": self.confidence.cpu(),
                "confirmed": self.confirmed.cpu(), "threshold": self.threshold.cpu()}

    def load_state_dict(self, state: Any) -> None:
        if not state:
            return
        if self.labels is not None and state["labels"].shape != self.labels.shape:
            raise ShapeError(f"callback {OWNER!r}: the checkpointed state holds "
                             f"{state['labels'].shape[0]} unlabelled samples, this run's dataset "
                             f"{self.labels.shape[0]} (num_samples)")
        device = self.labels.device if self.labels is not None else torch.device("cpu")
        for name in ("labels", "confidence", "confirmed", "threshold"):
            setattr(self, name, state[name].to(device))


CARD = Card(
    name="cw_bass_confidence_weighting", kind="callback",
    title="CW-BASS: Confidence-Weighted Boundary-Aware Learning for Semi-Supervised Semantic "
          "Segmentation",
    paper="arXiv:2502.15152",
    summary="Stored pseudo-labels with confidences; the unlabelled loss weights each by its "
            "confidence where it reaches a dynamic threshold (EMA of the mean confidence, "
            "clipped), and confidences the model does not re-confirm decay every epoch.",
    formula="L = L_objective + lambda sum_i w_i CE(p_s(x_i), y~_i) / sum_i w_i; w_i = c_i 1[c_i >= "
            "tau]; tau <- clip(m tau + (1 - m) mean_batch max p(x), tau_min, tau_max); per epoch "
            "c_i <- delta c_i unless re-confirmed; defaults m = 0.99, [tau_min, tau_max] = "
            "[0.5, 0.95], delta = 0.99, tau_0 = 0.95",
    left_out="The boundary-aware module (edge delineation), DeepLabV3+ and the segmentation "
             "datasets: here one pseudo-label per sample, not per pixel, and no separate teacher "
             "(ST++'s stage I model) - the pseudo-labels come from the model's own no-gradient "
             "prediction on the teacher view as it trains. The constants (m, the clip range, "
             "delta, tau_0) and the re-confirmation rule are our reconstruction, not checked "
             "against the paper's equations (its method section and code were not available "
             "to us).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CWBASSConfidenceWeighting, card=CARD)
