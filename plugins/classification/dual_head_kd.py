"""Dual-head knowledge distillation: cross-entropy on the student's head, a logit-level
distillation loss on an auxiliary head over the same features.

Yang, Wang, Wen, Zhang, Xie & Huang, "Dual-Head Knowledge Distillation: Enhancing Logits
Utilization with an Auxiliary Head", 2024 (arXiv:2411.08937): the BinaryKL loss (a binary KL
per class between the sigmoids of teacher and student logits, times T^2) transfers more of
the teacher's logits than softmax KL, but in one linear head together with CE it makes the
head collapse; a second linear head on the backbone's features takes the distillation loss
alone, and only the first head is used at test time. The code we found (an mdistiller
``DHKD`` distiller) puts ``BinaryKLNorm`` (a binary KL of ``sigmoid((z - t) / T)`` against
1/2) on the auxiliary head; ``kd="binary_kl_norm"`` selects it.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import nn

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

KD_LOSSES = ("binary_kl", "binary_kl_norm", "softmax_kl")


def binary_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample ``T^2 sum_k KL(Bern(sigmoid(t_k / T)) || Bern(sigmoid(z_k / T)))`` [B]
    (log-sigmoids: no clamping)."""
    z = cls.upcast(student) / temperature
    t = teacher.to(z.dtype) / temperature
    p = torch.sigmoid(t)
    kl = (p * (F.logsigmoid(t) - F.logsigmoid(z))
          + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-z)))
    return temperature ** 2 * kl.sum(-1)


def binary_kl_norm(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample ``T^2 sum_k KL(Bern(1/2) || Bern(sigmoid((z_k - t_k) / T)))`` [B]: zero when
    the logits equal the teacher's."""
    d = (cls.upcast(student) - teacher.to(cls.compute_dtype(student))) / temperature
    kl = -math.log(2) - 0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    return temperature ** 2 * kl.sum(-1)


def kd_term(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation loss ``kind`` (one of :data:`KD_LOSSES`) per sample."""
    if kind == "binary_kl":
        return binary_kl(student, teacher, temperature)
    if kind == "binary_kl_norm":
        return binary_kl_norm(student, teacher, temperature)
    return cls.distillation_kl(student, teacher, temperature)


class DualHeadKD(Objective):
    """``ce_weight CE(Views.logits, y) + kd_weight KD(aux(h), t)``: ``Views.logits`` is the
    student's own head, ``h = Views.extras[keys.FEATURES][0]`` the backbone features under it
    (an encoder with a ``head``), ``t`` the teacher's logits (``Views.extras[keys.TEACHER][0]``)
    and ``aux`` this objective's linear auxiliary head (trained by the KD term alone; its
    gradient reaches the backbone through ``h``)."""

    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS, Input.FEATURES})
    batch_coupled = False

    def __init__(self, num_classes: Annotated[int, Ge(2), FromData("num_classes")] = 10,
                 temperature: Annotated[float, Gt(0)] = 4.0,
                 ce_weight: Annotated[float, Ge(0)] = 1.0, kd_weight: Annotated[float, Ge(0)] = 1.0,
                 kd: Annotated[str, one_of(KD_LOSSES)] = "binary_kl"):
        super().__init__()
        self.num_classes, self.temperature, self.kd = num_classes, temperature, kd
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.aux_head = nn.LazyLinear(num_classes)
        self.requires = {"logits": True, "targets": ce_weight > 0,
                         "extras": (keys.TEACHER, keys.FEATURES)}

    def aux_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The auxiliary head's scores ``W h + b`` [B, C], in float32 at least."""
        if isinstance(self.aux_head.weight, nn.UninitializedParameter):
            self.aux_head(h[:0].detach().to(self.aux_head.weight.dtype))  # materialises it
        dtype = torch.promote_types(h.dtype, torch.float32)
        return F.linear(h.to(dtype), self.aux_head.weight.to(dtype), self.aux_head.bias.to(dtype))

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        if z.shape[1] != self.num_classes:
            raise ShapeError(f"dual_head_kd: Views.logits has {z.shape[1]} classes, but "
                             f"num_classes={self.num_classes}")
        teacher = cls.teacher_logits("dual_head_kd", views)
        entry = views.extras[keys.FEATURES]
        h = entry[0] if isinstance(entry, (tuple, list)) else entry
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[0] != z.shape[0] \
                or not h.is_floating_point():
            raise ShapeError(f"dual_head_kd: Views.extras[{keys.FEATURES!r}] must hold floating "
                             f"features [{z.shape[0]}, D], got "
                             f"{list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
        per_sample = self.kd_weight * kd_term(self.kd, self.aux_logits(h), teacher, self.temperature)
        logs = {"kd": per_sample.detach().mean()}
        if self.ce_weight > 0:
            t = cls.targets("dual_head_kd", z, batch.targets)
            ce = -cls.target_log_prob(z, t)
            per_sample = per_sample + self.ce_weight * ce
            logs["ce"] = ce.detach().mean()
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        c = self.num_classes
        logits = torch.randn(batch_size, c, generator=generator).requires_grad_()
        features = torch.randn(batch_size, 8, generator=generator).requires_grad_()
        teacher = 2 * torch.randn(batch_size, c, generator=generator)
        return (Views(logits=logits, extras={keys.TEACHER: (teacher,), keys.FEATURES: (features,)}),
                Batch(targets=torch.arange(batch_size) % c))


CARD = Card(
    name="dual_head_kd", kind="objective",
    title="Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
    paper="arXiv:2411.08937",
    summary="Cross-entropy on the student's classifier and a logit-level distillation loss "
            "(BinaryKL) on a second, auxiliary linear head over the same features, so the two "
            "losses do not conflict inside one head.",
    formula="L = ce_weight CE(W_1 h, y) + kd_weight T^2 sum_k KL(Bern(sigmoid(t_k / T)) || "
            "Bern(sigmoid((W_2 h)_k / T))); kd='binary_kl_norm': T^2 sum_k KL(Bern(1/2) || "
            "Bern(sigmoid(((W_2 h)_k - t_k) / T))); kd='softmax_kl': T^2 KL(softmax(t/T) || "
            "softmax(W_2 h / T))",
    left_out="We did not find the authors' code or their loss weights and temperature: T = 4 "
             "(the knowledge_distillation default) and weights 1, 1 are our choice; the "
             "auxiliary loss defaults to the paper's BinaryKL, computed with log-sigmoids "
             "(the code we found clamps probabilities at 1e-8). The auxiliary head is a "
             "LazyLinear (its input width set on the first batch). The paper's CIFAR/ImageNet "
             "teacher-student pairs are not shipped.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DualHeadKD, card=CARD)
