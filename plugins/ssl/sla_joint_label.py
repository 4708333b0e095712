"""SLA: self-supervised label augmentation, a joint (class x transformation) softmax.

Lee, Hwang & Shin, "Self-supervised Label Augmentation via Input Transformations", ICML 2020
(arXiv:1910.05872).

Each input ``x`` is seen under ``M`` transformations ``t_1 .. t_M`` (rotations by 0, 90, 180
and 270 degrees); one classifier over ``N x M`` joint labels is trained with
``L_SLA = 1/M sum_j CE(z~(t_j(x)), (y, j))`` (eq. 4), joint label ``(y, j) = y M + j`` as in
the authors' code. At test time the joint logits of the ``M`` transformed copies are
aggregated, ``s_y = 1/M sum_j z~(t_j(x))_{(y, j)}`` and ``P_agg(y | x) = softmax(s)_y``
(eq. 5). SLA+SD (eq. 6) adds a single-label head ``u`` on the features of the untransformed
input, distilled from the aggregated prediction:
``L = L_SLA + tau^2 KL(softmax(sg(s)/tau) || softmax(u/tau)) + beta CE(u, y)``.

Here the ``M`` transformed copies are the ``M`` views of the batch (one :class:`SLARotation`
transform per view, view ``j`` rotated by ``j`` quarter turns), so the encoder's output on each
view, ``[B, N M]``, is the joint logits of that view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.classification import distillation_kl, targets, upcast
from sdk.context import FromData
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Transform
from sdk.keys import FEATURES
from sdk.types import Batch, Loss, Views


def joint_labels(y: Tensor, j: int | Tensor, m: int) -> Tensor:
    """The joint label ``(y, j) = y m + j`` of class ``y`` under transformation ``j`` of ``m``."""
    return y * m + j


def aggregate(joint_logits: Sequence[Tensor]) -> Tensor:
    """``s [B, N]`` with ``s_y = 1/M sum_j z_j[:, y M + j]`` from the joint logits ``z_j
    [B, N M]`` of the ``M`` transformed copies (aggregated inference, eq. 5:
    ``P_agg = softmax(s)``)."""
    m = len(joint_logits)
    return torch.stack([upcast(z)[:, j::m] for j, z in enumerate(joint_logits)]).mean(0)


def sla_loss(joint_logits: Sequence[Tensor], y: Tensor) -> Tensor:
    """``1/M sum_j CE(z_j, y M + j)`` per sample ``[B]`` (eq. 4)."""
    m = len(joint_logits)
    ce = [F.cross_entropy(upcast(z), joint_labels(y, j, m), reduction="none")
          for j, z in enumerate(joint_logits)]
    return torch.stack(ce).mean(0)


def sla_sd_loss(joint_logits: Sequence[Tensor], single_logits: Tensor, y: Tensor,
                temperature: float = 1.0, beta: float = 1.0) -> Tensor:
    """SLA+SD per sample ``[B]`` (eq. 6): ``L_SLA + tau^2 KL(softmax(sg(s)/tau) ||
    softmax(u/tau)) + beta CE(u, y)``, ``s`` the aggregated joint logits, ``u`` the single-label
    head's logits on the untransformed input."""
    kd = distillation_kl(single_logits, aggregate(joint_logits).detach(), temperature)
    ce = F.cross_entropy(upcast(single_logits), y, reduction="none")
    return sla_loss(joint_logits, y) + kd + beta * ce


class SLAJointLabel(Objective):
    """SLA over ``num_transforms`` views: ``Views.embeddings[j]`` are the joint logits
    ``[B, N M]`` of the input under transformation ``j`` (view ``j`` must be transformed by
    ``t_j``, e.g. :class:`SLARotation` with ``turns=j``; view 0 the identity), ``Batch.targets``
    the class ids ``[B]`` in ``[0, N)``.

    ``self_distillation`` (SLA+SD): the objective owns the single-label head ``u``, a linear layer
    ``feature_dim -> num_classes`` on the backbone features of view 0
    (``Views.extras["features"][0]``), trained with ``beta CE(u, y)`` and distilled from the
    aggregated prediction at temperature ``tau``. ``logs`` hold the single-view accuracy (joint
    logits of view 0 at ``(y, 0)``) and the aggregated accuracy of the batch.
    """

    requires = {"views": 2, "targets": True}
    consumes = frozenset({Input.LABELS})
    batch_coupled = False

    def __init__(self, num_transforms: Annotated[int, Ge(2)] = 4,
                 num_classes: Annotated[int | None, FromData("num_classes"), Ge(1)] = None,
                 self_distillation: bool = False,
                 feature_dim: Annotated[int | None, Ge(1)] = None,
                 temperature: Annotated[float, Gt(0)] = 1.0,
                 beta: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        if self_distillation and (num_classes is None or feature_dim is None):
            raise ConfigError("sla_joint_label: self_distillation needs num_classes and "
                              "feature_dim (the single-label head's sizes)",
                              param="num_classes" if num_classes is None else "feature_dim")
        self.requires = {"views": num_transforms, "targets": True}
        if self_distillation:
            self.requires["extras"] = (FEATURES,)
        self.num_transforms, self.num_classes = num_transforms, num_classes
        self.self_distillation, self.temperature, self.beta = self_distillation, temperature, beta
        self.head = nn.Linear(feature_dim, num_classes) if self_distillation else None

    def _check(self, views: Views, batch: Batch) -> tuple[list[Tensor], Tensor]:
        owner, m = f"objective {self.name!r}", self.num_transforms
        if views.n_views != m:
            raise ShapeError(f"{owner}: needs exactly {m} views (one per transformation, "
                             f"num_transforms={m}), got {views.n_views}")
        width = views.embeddings[0].shape[1]
        n = self.num_classes if self.num_classes is not None else width // m
        if width != n * m or n < 1:
            raise ShapeError(f"{owner}: Views.embeddings must be joint logits [B, num_classes * "
                             f"{m}]" + (f" = [B, {n * m}]" if self.num_classes else "")
                             + f", got {list(views.embeddings[0].shape)}")
        zs = list(views.embeddings)
        y = targets(owner, zs[0][:, ::m], batch.targets, soft=False).ids
        return zs, y

    def forward(self, views: Views, batch: Batch) -> Loss:
        zs, y = self._check(views, batch)
        m = self.num_transforms
        agg = aggregate(zs)
        logs = {"single_accuracy": (zs[0][:, ::m].argmax(1) == y).float().mean().detach(),
                "aggregated_accuracy": (agg.argmax(1) == y).float().mean().detach()}
        if not self.self_distillation:
            per_sample = sla_loss(zs, y)
            return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)
        if FEATURES not in views.extras:
            raise RequirementError(f"objective {self.name!r} with self_distillation needs "
                                   "Views.extras['features'] (the backbone features per view)")
        h = views.extras[FEATURES][0]
        if h.dim() != 2 or h.shape[0] != y.shape[0] or h.shape[1] != self.head.in_features:
            raise ShapeError(f"objective {self.name!r}: Views.extras['features'][0] must be "
                             f"[{y.shape[0]}, {self.head.in_features}] (feature_dim), got "
                             f"{list(h.shape)}")
        u = self.head(h if torch.is_autocast_enabled(h.device.type) else h.to(self.head.weight.dtype))
        logs["head_accuracy"] = (u.argmax(1) == y).float().mean().detach()
        per_sample = sla_sd_loss(zs, u, y, self.temperature, self.beta)
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        n = self.num_classes or 3
        zs = tuple(torch.randn(batch_size, n * self.num_transforms, generator=generator)
                   .requires_grad_() for _ in range(self.num_transforms))
        extras = {}
        if self.self_distillation:
            extras[FEATURES] = tuple(torch.randn(batch_size, self.head.in_features,
                                                 generator=generator).requires_grad_()
                                     for _ in range(self.num_transforms))
        y = torch.randint(0, n, (batch_size,), generator=generator)
        return Views(embeddings=zs, extras=extras), Batch(targets=y)


class SLARotation(Transform):
    """Rotates every image by ``turns`` quarter turns (``torch.rot90`` over the last two
    dimensions; 90 ``turns`` degrees counter-clockwise). ``x`` is ``[B, ..., H, W]``, or flat
    ``[B, H*W]`` images of ``shape`` ``(H, W)``; the output has the input's shape (square
    images when ``turns`` is odd). Deterministic: applied in training and evaluation alike (SLA's
    aggregated inference transforms test inputs too)."""

    def __init__(self, turns: Annotated[int, Interval(ge=0, le=3)] = 1,
                 shape: tuple[Annotated[int, Ge(1)], Annotated[int, Ge(1)]] | None = (8, 8)):
        super().__init__()
        self.turns, self.shape = turns, None if shape is None else tuple(shape)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        owner = f"transform {self.name!r}"
        if x.dim() == 2:
            if self.shape is None or self.shape[0] * self.shape[1] != x.shape[1]:
                raise ShapeError(f"{owner}: flat x [B, H*W] needs shape=(H, W) with H*W = "
                                 f"{x.shape[1]}, got shape={self.shape}")
            img = x.reshape(x.shape[0], *self.shape)
        elif x.dim() >= 3:
            img = x
        else:
            raise ShapeError(f"{owner}: x must be images [B, ..., H, W] or flat [B, H*W], got "
                             f"{list(x.shape)}")
        h, w = img.shape[-2:]
        if self.turns % 2 and h != w:
            raise ShapeError(f"{owner}: an odd number of quarter turns needs square images, got "
                             f"{h}x{w}")
        out = torch.rot90(img, self.turns, dims=(-2, -1)) if self.turns else img
        return out.reshape(x.shape), batch

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        h, w = self.shape or (4, 4)
        x = torch.randn(batch_size, h * w, generator=generator)
        return (x if self.shape else x.reshape(batch_size, 1, h, w)), Batch(
            targets=torch.arange(batch_size) % 3, index=torch.arange(batch_size))

    def extra_repr(self) -> str:
        return f"turns={self.turns}, shape={self.shape}"


def sla_rotations(shape: tuple[int, int] | None = (8, 8), m: int = 4) -> list[SLARotation]:
    """The per-view transforms of SLA with rotations: view ``j`` rotated by ``j`` quarter turns
    (``m`` = 2 or 4: 0/180 or 0/90/180/270 degrees)."""
    if m not in (2, 4):
        raise ConfigError(f"sla_rotations: m must be 2 or 4 rotations, got {m}", param="m")
    return [SLARotation(turns=j * 4 // m, shape=shape) for j in range(m)]


CARD = Card(
    name="sla_joint_label", kind="objective",
    title="Self-supervised Label Augmentation via Input Transformations",
    paper="arXiv:1910.05872",
    summary="One classifier over N x M joint (class, transformation) labels, trained on the M "
            "transformed copies of each input (the M views: rotations by 0/90/180/270 degrees "
            "with sla_rotation); predictions aggregate the joint logits of the M copies. "
            "Optional SLA+SD: a single-label head distilled from the aggregated prediction.",
    formula="L_SLA = 1/M sum_j CE(z~(t_j x), y M + j); s_y = 1/M sum_j z~(t_j x)_{y M + j}, "
            "P_agg = softmax(s); SLA+SD: L = L_SLA + tau^2 KL(softmax(sg(s)/tau) || "
            "softmax(u(f(x))/tau)) + beta CE(u(f(x)), y), tau = beta = 1",
    left_out="The transformations other than rotation (colour permutation, their combinations) "
             "and the paper's networks and schedules; the authors' optional extra terms "
             "('with_large_loss': L_SLA times M, 'with_training_agg': CE on the aggregated logits "
             "during training) are not offered. The single-label head reads the backbone features "
             "of view 0 (the identity), as the authors' code does with the unrotated copy.",
)

ROTATION_CARD = Card(
    name="sla_rotation", kind="transform",
    title="Self-supervised Label Augmentation via Input Transformations (rotation views)",
    paper="arXiv:1910.05872",
    summary="Rotates images by a fixed number of quarter turns (tensor op, training and "
            "evaluation alike): one per view gives sla_joint_label its M transformed copies.",
    formula="x' = rot90(x, turns) over (H, W); view j of SLA: turns = j (M = 4)",
    left_out="Random (non-fixed) rotations; colour permutations.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SLAJointLabel, card=CARD)
    registry.add(SLARotation, card=ROTATION_CARD)
