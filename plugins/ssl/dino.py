"""DINO: self-distillation with no labels; a student matches a momentum teacher's centred,
sharpened output distribution on other views.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, resolve_gather
from sdk.errors import ConfigError, RequirementError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import Center, at_least_float32, check_teacher, teacher_temperature
from sdk.types import Batch, Loss, Views


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
              center: torch.Tensor | float = 0.0, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> torch.Tensor:
    """Per sample ``[B]``: ``sum_{i} sum_{v != i} H(P_t(x_i), P_s(x_v)) / n_terms`` over the
    teacher's (global) views ``i`` and every student view ``v``: ``P_t = softmax((g_t - c) /
    tau_t)`` (no gradient), ``P_s = softmax(g_s / tau_s)``, ``H(a, b) = -sum_k a_k log b_k``
    (eq. 3; the loss is its mean over the batch)."""
    targets = [F.softmax((at_least_float32(t.detach()) - center) / teacher_temp, dim=-1)
               for t in teacher]
    log_p = [F.log_softmax(at_least_float32(s) / student_temp, dim=-1) for s in student]
    terms = [-(q * log_p[v]).sum(-1) for i, q in enumerate(targets)
             for v in range(len(student)) if v != i]
    return torch.stack(terms).mean(0)


class DINO(Objective):
    """DINO's loss on the student's head outputs (``Views.embeddings``, e.g. from the
    ``dino_head`` encoder) and a momentum teacher's (``Views.extras["teacher"]``, the ``ema``
    teacher: a copy of backbone and head, cosine momentum 0.996 -> 1) on the first ``n_global``
    views (the global crops; the student sees every view).

    The teacher's outputs are centred by :class:`sdk.ssl.Center` (a buffer, checkpointed,
    updated with ``center_momentum`` after every training forward over the global batch) and
    sharpened by ``teacher_temp``, reached linearly from ``warmup_teacher_temp`` over
    ``warmup_steps`` optimizer steps when both are given (the paper: 0.04 -> 0.07 over 30
    epochs). Given the centre the loss is per sample; the batch couples through the centre
    alone: ``gather`` ("auto": under DDP) all-reduces its mean over the ranks, as the authors
    do, so every rank keeps the same centre (False: each rank its own). No output is gathered."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = True

    def __init__(self, student_temp: Annotated[float, Gt(0)] = 0.1,
                 teacher_temp: Annotated[float, Gt(0)] = 0.04,
                 warmup_teacher_temp: Annotated[float | None, Gt(0)] = None,
                 warmup_steps: Annotated[int, Ge(0)] = 0,
                 center_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.9,
                 n_global: Annotated[int, Ge(1)] = 2, gather: Gather = "auto"):
        super().__init__()
        if (warmup_teacher_temp is None) != (warmup_steps == 0):
            raise ConfigError("dino: give warmup_teacher_temp and warmup_steps > 0 together (the "
                              f"warm-up), or neither; got {warmup_teacher_temp} and {warmup_steps}",
                              param="warmup_steps")
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_steps = warmup_teacher_temp, warmup_steps
        self.n_global, self.gather = n_global, gather
        self.center = Center(center_momentum, owner="objective 'dino'")
        self._step = 0

    def set_progress(self, step: int, max_steps: int | None) -> None:
        self._step = step

    def current_teacher_temp(self) -> float:
        return teacher_temperature(self._step, self.warmup_steps, self.warmup_teacher_temp,
                                   self.teacher_temp)

    def forward(self, views: Views, batch: Batch) -> Loss:
        if views.n_views < self.n_global:
            raise RequirementError(f"objective 'dino' needs at least n_global={self.n_global} "
                                   f"views, got {views.n_views}")
        teacher = check_teacher("objective 'dino'", views, self.n_global)
        student = views.embeddings
        self.center.check(student[0].shape[1])
        temp = self.current_teacher_temp()
        center = self.center.center if self.center.center.numel() else 0.0
        per_sample = dino_loss(student, teacher, center, self.student_temp, temp)
        if self.training:
            self.center.update(torch.stack(teacher), all_reduce=resolve_gather(self.gather))
        value = per_sample.mean()
        return Loss(value=value, per_sample=per_sample, logs={"teacher_temp": value.new_tensor(temp)})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """``max(2, n_global)`` views of 16 head outputs, and the teacher's on each."""
        n = max(2, self.n_global)
        s = tuple(torch.randn(batch_size, 16, generator=generator).requires_grad_() for _ in range(n))
        t = tuple(torch.randn(batch_size, 16, generator=generator) for _ in range(n))
        return Views(embeddings=s, extras={keys.TEACHER: t}), Batch()


CARD = Card(
    name="dino", kind="objective",
    title="Emerging Properties in Self-Supervised Vision Transformers",
    paper="arXiv:2104.14294",
    summary="Self-distillation: the student's softmax on every view matches the momentum "
            "teacher's centred, sharpened softmax on the other global views.",
    formula="P_t = softmax((g_t(x_i) - c) / tau_t), P_s = softmax(g_s(x_v) / tau_s); "
            "L = sum_{i global} sum_{v != i} -mean_b sum_k P_t log P_s / n_terms; "
            "c <- m c + (1 - m) mean(g_t); tau_t: warmup_teacher_temp -> teacher_temp",
    left_out="The teacher is the ema teacher and the head the dino_head encoder; the teacher "
             "encodes every view (the engine runs a teacher on all views), of which the first "
             "n_global are used. The warm-up is counted in optimizer steps (the authors: "
             "epochs). Freezing the head's last layer in the first epoch, the weight-decay "
             "schedule and gradient clipping are training settings, not part of the loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DINO, card=CARD)
