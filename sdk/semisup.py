"""Semi-supervised learning: the unlabelled part of a step and pseudo-labels with thresholds.

A Trainer fitted with an unlabelled loader (``fit(labelled, unlabeled=loader)``) gives the
objective ``Views.extras[keys.UNLABELED]``, the encoder's output on each unlabelled view
(``Trainer(unlabeled_transforms=(weak, strong))``), and ``[keys.UNLABELED_INDEX]``, their
dataset indices. :func:`unlabeled_views` reads and checks them.

Pseudo-labels (FixMatch, Sohn et al. 2020, and its descendants) are the arg-max of the weak
view's class probabilities, computed without gradient (:func:`pseudo_labels`); a sample counts
when its confidence reaches its class's threshold (``>=``). Thresholds are modules, so that
their state lives in the objective's ``state_dict`` and in checkpoints:

* :class:`FixedThreshold`: one threshold ``tau`` for every class (FixMatch);
* :class:`ClassThresholds`: a fixed threshold per class;
* :class:`CurriculumThreshold`: FlexMatch's curriculum (Zhang et al. 2021, arXiv:2110.08263):
  ``tau_c = M(beta_c) * tau`` with the convex warm-up ``M(x) = x / (2 - x)``, where
  ``beta_c = sigma_c / max(max_k sigma_k, N - sum_k sigma_k)`` and ``sigma_c`` counts the
  unlabelled samples whose latest confident (``conf >= tau``) prediction is ``c``: per-sample
  state keyed by the dataset index (``[N]``, ``-1`` = none yet), updated in training mode
  after each batch and all-gathered over the ranks by index.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk import classification as cls
from sdk import distributed, keys
from sdk.classification import upcast
from sdk.context import FromData
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids


def unlabeled_views(owner: str, views: Views, *, n_views: int = 2,
                    num_classes: int | None = None) -> tuple[Tensor, ...] | None:
    """The encoder's outputs on the unlabelled views, ``n_views`` or more ``[U, C]`` tensors
    (``C = num_classes`` when given), or ``None`` when the step has no unlabelled batch
    (evaluation). Raises :class:`ShapeError` / :class:`RequirementError` naming ``owner``."""
    found = views.extras.get(keys.UNLABELED)
    if found is None:
        return None
    if not isinstance(found, (tuple, list)) or len(found) < n_views:
        count = len(found) if isinstance(found, (tuple, list)) else type(found).__name__
        raise RequirementError(f"objective {owner!r} needs {n_views} unlabelled views "
                               f"(Trainer(unlabeled_transforms=...): weak, then strong) in "
                               f"extras[{keys.UNLABELED!r}], got {count}")
    first = found[0]
    for i, z in enumerate(found):
        if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
            what = f"{z.dtype} {list(z.shape)}" if isinstance(z, Tensor) else type(z).__name__
            raise ShapeError(f"objective {owner!r}: extras[{keys.UNLABELED!r}][{i}] must be "
                             f"floating class scores [U, C], got {what}")
        if z.shape != first.shape:
            raise ShapeError(f"objective {owner!r}: extras[{keys.UNLABELED!r}] views differ in "
                             f"shape: {list(first.shape)} and {list(z.shape)} (view {i})")
        if num_classes is not None and z.shape[1] != num_classes:
            raise ShapeError(f"objective {owner!r}: extras[{keys.UNLABELED!r}][{i}] has "
                             f"{z.shape[1]} classes, Views.logits {num_classes}")
    if first.shape[0] == 0:
        raise ShapeError(f"objective {owner!r}: extras[{keys.UNLABELED!r}] holds 0 samples")
    return tuple(found)


def unlabeled_index(owner: str, views: Views, rows: int) -> Tensor:
    """``extras[keys.UNLABELED_INDEX]``, checked as ``rows`` integer ids."""
    index = views.extras.get(keys.UNLABELED_INDEX)
    if index is None:
        raise RequirementError(f"objective {owner!r} keys its pseudo-label state by "
                               f"extras[{keys.UNLABELED_INDEX!r}] (the unlabelled loader's "
                               f"indices: items (x, y, index)), got None")
    check_ids(f"objective {owner!r}", f"extras[{keys.UNLABELED_INDEX!r}]", index)
    if index.shape[0] != rows:
        raise ShapeError(f"objective {owner!r}: extras[{keys.UNLABELED_INDEX!r}] has "
                         f"{index.shape[0]} rows for {rows} unlabelled samples")
    return index


def pseudo_labels(weak: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence ``max_c p_c`` and hard label ``argmax_c p_c`` of ``p = softmax(weak)``
    (float32 at least), computed without gradient."""
    with torch.no_grad():
        confidence, labels = upcast(weak.detach()).softmax(-1).max(-1)
    return confidence, labels


def masked_cross_entropy(strong: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """FixMatch's unlabelled loss: ``sum_i mask_i CE(strong_i, labels_i) / U``, averaged over
    all ``U`` unlabelled samples, kept or not (as the authors' code)."""
    ce = F.cross_entropy(upcast(strong), labels, reduction="none")
    return (ce * mask.to(ce.dtype)).mean()


class Threshold(nn.Module, abc.ABC):
    """A confidence threshold per unlabelled sample: ``forward(labels, index) -> [U]`` (float64,
    so that a threshold given as a number is compared as it was given); in training mode
    :meth:`observe` learns from the batch's predictions afterwards."""

    @abc.abstractmethod
    def forward(self, labels: Tensor, index: Tensor | None) -> Tensor:
        """The threshold of each sample given its pseudo-label (and dataset index)."""

    def observe(self, confidence: Tensor, labels: Tensor, index: Tensor | None) -> None:
        """What the batch's predictions teach the threshold (nothing for fixed ones)."""

    needs_index = False
    """Whether :meth:`forward` and :meth:`observe` read the dataset indices."""


class FixedThreshold(Threshold):
    """``tau`` for every class."""

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    def forward(self, labels: Tensor, index: Tensor | None) -> Tensor:
        return torch.full(labels.shape, self.tau, dtype=torch.float64, device=labels.device)


class ClassThresholds(Threshold):
    """``taus[label]``: a fixed threshold per class."""

    def __init__(self, taus: Sequence[float]):
        super().__init__()
        self.register_buffer("taus", torch.tensor(tuple(taus), dtype=torch.float64))

    def forward(self, labels: Tensor, index: Tensor | None) -> Tensor:
        return self.taus[labels]


class CurriculumThreshold(Threshold):
    """FlexMatch's curriculum thresholds with the convex mapping and threshold warm-up (the
    module docstring has the formula); ``selected`` ``[N]`` is the per-sample state."""

    needs_index = True

    def __init__(self, tau: float, num_classes: int, num_samples: int):
        super().__init__()
        self.tau, self.num_classes, self.num_samples = tau, num_classes, num_samples
        self.register_buffer("selected", torch.full((num_samples,), -1, dtype=torch.long))

    def learning_effects(self) -> Tensor:
        """``beta_c`` ``[C]``: each class's count of confident predictions over the largest
        count, the samples not yet predicted confidently counted as one more class."""
        counts = torch.bincount(self.selected + 1, minlength=self.num_classes + 1).double()
        return counts[1:] / counts.max().clamp_min(1)

    def forward(self, labels: Tensor, index: Tensor | None) -> Tensor:
        beta = self.learning_effects()
        return (beta / (2 - beta) * self.tau)[labels]

    def observe(self, confidence: Tensor, labels: Tensor, index: Tensor | None) -> None:
        if not self.training:
            return
        with torch.no_grad():
            index = distributed.gather_no_grad(index)
            labels = distributed.gather_no_grad(labels)
            keep = distributed.gather_no_grad(confidence >= self.tau)
            self.selected[index] = torch.where(keep, labels, self.selected[index])


def make_threshold(owner: str, tau: float, *, class_thresholds: Sequence[float] | None = None,
                   curriculum: bool = False, num_classes: int | None = None,
                   num_samples: int | None = None) -> Threshold:
    """The threshold of ``owner``'s parameters: per-class values, FlexMatch's curriculum on
    ``tau`` (needs ``num_classes`` and ``num_samples``, the unlabelled set's size, indices
    ``0 .. num_samples - 1``), or ``tau`` for every class."""
    if class_thresholds is not None and curriculum:
        raise ConfigError(f"{owner}: class_thresholds and curriculum exclude each other "
                          f"(the curriculum computes the per-class thresholds)",
                          param="class_thresholds")
    if class_thresholds is not None:
        if num_classes is not None and len(class_thresholds) != num_classes:
            raise ConfigError(f"{owner}: class_thresholds has {len(class_thresholds)} values for "
                              f"num_classes={num_classes}", param="class_thresholds")
        return ClassThresholds(class_thresholds)
    if curriculum:
        if num_classes is None or num_samples is None:
            raise ConfigError(f"{owner}: curriculum=True needs num_classes and num_samples (the "
                              f"unlabelled set's size)", param="num_samples")
        return CurriculumThreshold(tau, num_classes, num_samples)
    return FixedThreshold(tau)


def confident(owner: str, threshold: Threshold, views: Views, weak: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(confidence, labels, mask, index)`` of the weak view: pseudo-labels, whether each
    reaches its threshold (``confidence >= tau``, float), and the indices when the threshold
    reads them. ``threshold.observe`` is the caller's, once the loss is computed."""
    confidence, labels = pseudo_labels(weak)
    index = unlabeled_index(owner, views, weak.shape[0]) if threshold.needs_index else None
    if isinstance(threshold, ClassThresholds) and threshold.taus.numel() != weak.shape[1]:
        raise ShapeError(f"objective {owner!r}: class_thresholds has {threshold.taus.numel()} "
                         f"values for {weak.shape[1]} classes")
    if isinstance(threshold, CurriculumThreshold):
        if threshold.num_classes != weak.shape[1]:
            raise ShapeError(f"objective {owner!r}: num_classes={threshold.num_classes}, but the "
                             f"unlabelled logits have {weak.shape[1]} classes")
        if index.device.type == "cpu":  # where the range check costs no device sync
            check_ids(f"objective {owner!r}", f"extras[{keys.UNLABELED_INDEX!r}]", index,
                      threshold.num_samples)
    mask = (confidence >= threshold(labels, index)).float()
    return confidence, labels, mask, index


class FixMatch(Objective):
    """FixMatch's loss on ``Views.logits`` (the labelled batch's first view) and the unlabelled
    views (weak ``extras[UNLABELED][0]``, strong ``[1]``):
    ``CE(logits, y) + lambda_u * sum_i mask_i CE(strong_i, argmax p_weak_i) / U`` with
    ``mask_i = [max p_weak_i >= tau_i]`` (a :class:`Threshold`). Without unlabelled views
    (evaluation) the loss is the labelled cross-entropy. Subclasses replace
    :meth:`unlabeled_loss` (the term ``lambda_u`` scales); the base of ``fixmatch``,
    ``shrinkmatch``."""

    requires = {"logits": True, "targets": True, "unlabeled": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, threshold: Annotated[float, Interval(ge=0, le=1)] = 0.95,
                 unlabeled_weight: Annotated[float, Ge(0)] = 1.0,
                 class_thresholds: tuple[Annotated[float, Interval(ge=0, le=1)], ...] | None = None,
                 curriculum: bool = False,
                 num_classes: Annotated[int | None, Ge(2), FromData("num_classes")] = None,
                 num_samples: Annotated[int | None, Ge(1)] = None):
        super().__init__()
        self.tau, self.unlabeled_weight = threshold, unlabeled_weight
        self.threshold = make_threshold(self.name, threshold, class_thresholds=class_thresholds,
                                        curriculum=curriculum, num_classes=num_classes,
                                        num_samples=num_samples)

    def labeled_loss(self, views: Views, batch: Batch) -> Tensor:
        z = views.logits
        t = cls.targets(self.name, z, batch.targets)
        return -cls.target_log_prob(z, t).mean()

    def unlabeled_loss(self, weak: Tensor, strong: Tensor, confidence: Tensor, labels: Tensor,
                       mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The unlabelled term and its logs, given the weak view's pseudo-labels."""
        return masked_cross_entropy(strong, labels, mask), {}

    def forward(self, views: Views, batch: Batch) -> Loss:
        supervised = self.labeled_loss(views, batch)
        found = unlabeled_views(self.name, views, num_classes=views.logits.shape[1])
        if found is None:
            return Loss(value=supervised, logs={"supervised": supervised.detach()})
        weak, strong = found[0], found[1]
        confidence, labels, mask, index = confident(self.name, self.threshold, views, weak)
        unsupervised, logs = self.unlabeled_loss(weak, strong, confidence, labels, mask)
        self.threshold.observe(confidence, labels, index)
        value = supervised + self.unlabeled_weight * unsupervised
        return Loss(value=value, logs={"supervised": supervised.detach(),
                                       "unsupervised": unsupervised.detach(),
                                       "mask_rate": mask.mean(), **logs})

    @classmethod
    def example_inputs(cls, batch_size: int, g: torch.Generator, *, mu: int = 7,
                       classes: int = 5) -> tuple[Views, Batch]:
        """A labelled batch of ``batch_size`` and ``mu * batch_size`` unlabelled samples, whose
        weak logits are confident for about half of them (for the conformance kit)."""
        u = mu * batch_size
        weak = torch.randn(u, classes, generator=g) * torch.linspace(0.5, 12, u)[:, None]
        strong = torch.randn(u, classes, generator=g).requires_grad_()
        views = Views(logits=torch.randn(batch_size, classes, generator=g).requires_grad_(),
                      extras={keys.UNLABELED: (weak, strong),  # the weak view gives no gradient
                              keys.UNLABELED_INDEX: torch.randperm(u, generator=g)})
        return views, Batch(targets=torch.randint(0, classes, (batch_size,), generator=g))
