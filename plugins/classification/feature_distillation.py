"""KD-Loss: a regression student guided by a Tough and a Tolerant teacher's predictions.

Fard & Mahoor, "Facial Landmark Points Detection Using Knowledge Distillation-Based Neural
Networks", Computer Vision and Image Understanding 2022 (arXiv:2111.07047); the form and the
constants follow the authors' code (github.com/aliprf/KD-Loss, custom_Losses.py ``kd_loss`` and
the weights of main.py). Per coordinate, the teachers' predictions are reflected to the
student's side of the ground truth; an assistive term pulls the student towards a teacher
(weight alpha) when it lies beyond it and pushes it back towards the ground truth (a negative
weight alpha^-) when it lies between the teacher and a band at 0.15 of the teacher's
distance; the main term is linear within the Tolerant teacher's distance of the ground truth
and quadratic beyond it.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import nn

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

BAND = 0.15
"""Where the negative-weight region ends, as a fraction of a teacher's distance to the ground truth."""
SLOPE = 3.0
"""The main term's slope within the Tolerant teacher's distance (the authors' code's 3)."""


def assist_weights(pred: torch.Tensor, gt: torch.Tensor, teacher: torch.Tensor, alpha: float,
                   alpha_minus: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, t')``: the teacher ``t' = gt + sign(pred - gt) |teacher - gt|`` reflected to the
    student's side, and per coordinate ``w = alpha`` where the student lies beyond it,
    ``alpha_minus`` where it lies between ``t'`` and the band ``b = gt + 0.15 (t' - gt)``."""
    side = torch.sign(pred - gt)
    dist = (teacher - gt).abs()
    reflected, band = gt + side * dist, gt + BAND * side * dist
    beyond = torch.sign(pred - reflected) * torch.sign(reflected - gt) > 0
    between = torch.sign(reflected - pred) * torch.sign(pred - band) >= 0
    return alpha * beyond.to(pred.dtype) + alpha_minus * between.to(pred.dtype), reflected


def kd_loss(pred: torch.Tensor, gt: torch.Tensor, tough: torch.Tensor, tolerant: torch.Tensor, *,
            alpha_tough: float = 1.9, alpha_minus_tough: float = -0.45, alpha_tolerant: float = 1.8,
            alpha_minus_tolerant: float = -0.4, main_weight: float = 2.0, tough_weight: float = 1.0,
            tolerant_weight: float = 1.0) -> torch.Tensor:
    """Per-sample mean over the coordinates of ``main_weight M + tough_weight w_T |T' - pred| +
    tolerant_weight w_t |t' - pred|``, ``M = 3 e`` for ``e = |gt - pred| <= d = |gt - tolerant|``,
    ``e^2 + 3 d - d^2`` beyond (continuous at ``e = d``)."""
    pred = cls.upcast(pred)
    gt, tough, tolerant = (t.to(pred.dtype) for t in (gt, tough, tolerant))
    with torch.no_grad():
        w_tough, t_tough = assist_weights(pred, gt, tough, alpha_tough, alpha_minus_tough)
        w_tol, t_tol = assist_weights(pred, gt, tolerant, alpha_tolerant, alpha_minus_tolerant)
    e, d = (gt - pred).abs(), (gt - tolerant).abs()
    main = torch.where(e <= d, SLOPE * e, e.square() + SLOPE * d - d.square())
    total = (main_weight * main + tough_weight * w_tough * (t_tough - pred).abs()
             + tolerant_weight * w_tol * (t_tol - pred).abs())
    return total.mean(-1)


class TwoTeachers(nn.Module):
    """One teacher model out of two fixed regressors: ``[tough(x), tolerant(x)]`` side by side
    (wrap it in :class:`sdk.classification.FrozenTeacher` for the Trainer)."""

    def __init__(self, tough: nn.Module, tolerant: nn.Module):
        super().__init__()
        self.tough, self.tolerant = tough, tolerant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tough(x), self.tolerant(x)], -1)


class FeatureDistillation(Objective):
    """KD-Loss on the student's predictions ``Views.embeddings[0]`` [B, D] against the ground
    truth ``Batch.targets`` [B, D] and the teachers' predictions
    ``Views.extras[keys.TEACHER][0]`` [B, 2 D] (Tough, then Tolerant: a :class:`TwoTeachers`
    in a FrozenTeacher)."""

    requires = {"views": 1, "targets": True, "extras": (keys.TEACHER,)}
    consumes = frozenset()
    batch_coupled = False

    def __init__(self, alpha_tough: Annotated[float, Ge(0)] = 1.9,
                 alpha_minus_tough: float = -0.45, alpha_tolerant: Annotated[float, Ge(0)] = 1.8,
                 alpha_minus_tolerant: float = -0.4, main_weight: Annotated[float, Gt(0)] = 2.0,
                 tough_weight: Annotated[float, Ge(0)] = 1.0,
                 tolerant_weight: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.weights = dict(alpha_tough=alpha_tough, alpha_minus_tough=alpha_minus_tough,
                            alpha_tolerant=alpha_tolerant, alpha_minus_tolerant=alpha_minus_tolerant,
                            main_weight=main_weight, tough_weight=tough_weight,
                            tolerant_weight=tolerant_weight)

    def forward(self, views: Views, batch: Batch) -> Loss:
        pred, gt = views.embeddings[0], batch.targets
        if pred.dim() != 2 or gt.shape != pred.shape or not gt.is_floating_point():
            raise ShapeError(f"feature_distillation: Batch.targets must be real values matching the "
                             f"predictions Views.embeddings[0] {list(pred.shape)} (a [B, D] regression), "
                             f"got {gt.dtype} {list(gt.shape)}")
        b, d = pred.shape
        entry = views.extras[keys.TEACHER]
        t = entry[0] if isinstance(entry, (tuple, list)) else entry
        if not isinstance(t, torch.Tensor) or t.shape != (b, 2 * d) or not t.is_floating_point():
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeError(f"feature_distillation: Views.extras[{keys.TEACHER!r}] must hold the "
                             f"Tough and Tolerant teachers' predictions side by side [{b}, {2 * d}], "
                             f"got {got}")
        t = t.detach()
        per_sample = kd_loss(pred, gt, t[:, :d], t[:, d:], **self.weights)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        gt = torch.randn(batch_size, 4, generator=generator)
        pred = (gt + 0.5 * torch.randn(batch_size, 4, generator=generator)).requires_grad_()
        teachers = gt.repeat(1, 2) + 0.3 * torch.randn(batch_size, 8, generator=generator)
        return Views(embeddings=(pred,), extras={keys.TEACHER: (teachers,)}), Batch(targets=gt)


CARD = Card(
    name="feature_distillation", kind="objective",
    title="Facial Landmark Points Detection Using Knowledge Distillation-Based Neural Networks",
    paper="arXiv:2111.07047",
    summary="KD-Loss for a regression student: a main term linear within the Tolerant "
            "teacher's error and quadratic beyond it, plus assistive terms that pull the "
            "student towards a Tough and a Tolerant teacher's predictions when it lies beyond "
            "them and push it towards the ground truth when it lies between.",
    formula="per coordinate, s = sign(p - y), T' = y + s |T - y|, b = y + 0.15 s |T - y|; "
            "w_T = alpha_T [sign(p - T') sign(T' - y) > 0] + alpha^-_T [sign(T' - p) sign(p - b) >= 0] "
            "(likewise w_t for the Tolerant teacher t); e = |y - p|, d = |y - t|; "
            "M = 3 e (e <= d), e^2 + 3 d - d^2 (e > d); "
            "L = mean(2 M + w_T |T' - p| + w_t |t' - p|)",
    left_out="The catalogue's description (L2 distillation of intermediate features and "
             "outputs) is not the paper's loss: this is the paper's KD-Loss, kept under the "
             "catalogue's name. Constants (alpha 1.9 / -0.45 Tough, 1.8 / -0.4 Tolerant, weights "
             "2 / 1 / 1, band 0.15, slope 3) are the authors' code's. Training the paper's "
             "two EfficientNet teachers, the MobileNetV2 student and the landmark datasets are "
             "not shipped; the teachers come as one model of their concatenated predictions "
             "(TwoTeachers in a FrozenTeacher).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FeatureDistillation, card=CARD)
