"""Momentum (EMA) target networks: the cosine momentum schedule and the EMA teacher that the
``ema`` and ``queue`` teachers (and the self-distillation methods) build on.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (schedule); Tarvainen & Valpola,
"Mean teachers are better role models", NeurIPS 2017 (EMA teacher).
"""

from __future__ import annotations

import copy
import math
from typing import Annotated

import torch
from annotated_types import Interval
from torch import nn

from sdk.errors import RequirementError, ShapeError
from sdk.interfaces import Teacher


def cosine_momentum(base: float, final: float, step: int, max_steps: int | None) -> float:
    """``final - (final - base) * (cos(pi k / K) + 1) / 2``; ``base`` when K is unknown."""
    if not max_steps:
        return base
    k = min(step, max_steps) / max_steps
    return final - (final - base) * (math.cos(math.pi * k) + 1) / 2


def linear_momentum(base: float, final: float, step: int, max_steps: int | None) -> float:
    """``base + (final - base) k / K`` (I-JEPA's and T-JEPA's schedule); ``base`` when K is unknown."""
    if not max_steps:
        return base
    return base + (final - base) * min(step, max_steps) / max_steps


class EMATeacher(Teacher):
    """``theta_t <- m theta_t + (1 - m) theta_s``; buffers are copied. ``m`` follows the
    cosine schedule from ``momentum`` to ``final_momentum`` (constant if they are equal); a
    subclass may set ``schedule`` to another ``(base, final, step, max_steps) -> m``."""

    produces = frozenset()  # its Views.extras["teacher"] is optional context; its weights are its product
    schedule = staticmethod(cosine_momentum)

    def __init__(self, student: nn.Module | None = None,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.996,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 1.0):
        super().__init__()
        self.momentum, self.final_momentum = momentum, final_momentum
        self.target: nn.Module | None = None
        if student is not None:
            self.attach(student)

    def attach(self, student: nn.Module) -> EMATeacher:
        """Start the target network as a frozen copy of ``student``."""
        self.target = copy.deepcopy(student)
        for p in self.target.parameters():
            p.requires_grad_(False)
        return self

    def _require_target(self) -> nn.Module:
        if self.target is None:
            raise RequirementError(f"teacher {self.name!r}: no student attached; call "
                                   "teacher.attach(encoder) or pass student=")
        return self.target

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._require_target()(x)

    @torch.no_grad()
    def update(self, *, student: nn.Module | None = None, views=None, batch=None, step: int = 0,
               max_steps: int | None = None) -> None:
        if student is None:
            raise RequirementError(f"teacher {self.name!r}: update() needs student= (the encoder "
                                   "being trained)")
        target = self._require_target()
        m = self.schedule(self.momentum, self.final_momentum, step, max_steps)
        t_params, s_params = list(target.parameters()), list(student.parameters())
        t_buffers, s_buffers = list(target.buffers()), list(student.buffers())
        if len(t_params) != len(s_params) or len(t_buffers) != len(s_buffers):
            raise ShapeError(f"teacher {self.name!r}: the student has {len(s_params)} parameters and "
                             f"{len(s_buffers)} buffers, the attached copy {len(t_params)} and "
                             f"{len(t_buffers)}: update() needs the student it was attached to")
        try:
            if t_params:
                torch._foreach_lerp_(t_params, s_params, 1.0 - m)
            if t_buffers:
                torch._foreach_copy_(t_buffers, s_buffers)
        except RuntimeError:  # say which tensor differs (only once torch failed: no cost per step)
            for kind, pairs in (("parameter", zip(t_params, s_params)),
                                ("buffer", zip(t_buffers, s_buffers))):
                for i, (t, s) in enumerate(pairs):
                    if t.shape != s.shape:
                        raise ShapeError(f"teacher {self.name!r}: the student's {kind} #{i} has shape "
                                         f"{list(s.shape)}, the attached copy's {list(t.shape)}: update() "
                                         "needs the student it was attached to") from None
            raise
