"""The infinite learning-rate schedule: warm up, cool down once to a constant rate, hold it for
as long as training goes on, and anneal only when a checkpoint is wanted.

Singh, Janson, Mehrbod, Ibrahim, Rish, Belilovsky & Thérien, "Beyond Cosine Decay: On the
effectiveness of Infinite Learning Rate Schedule for Continual Pre-training", 2025 (the
schedule of Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large
Language Models"): linear warm-up, cosine cooldown, constant phase, exponential annealing.
"""

from __future__ import annotations

import math
from typing import Annotated

import annotated_types

from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Schedule

_STEPS = annotated_types.Ge(0)
_LEVEL = annotated_types.Interval(gt=0, le=1)


def infinite_lr(step: int, max_steps: int | None = None, *, warmup_steps: int = 0,
                cooldown_steps: int = 0, constant_lr: float = 0.5, min_lr: float = 0.01,
                anneal_steps: int = 0, anneal_start: int | None = None) -> float:
    """The multiplier of the peak rate at optimizer step ``step`` (``W`` warm-up, ``C`` cooldown
    steps, ``A`` anneal steps starting at ``S``; ``c`` ``constant_lr``, ``m`` ``min_lr``):

    * ``t / W`` for ``t < W`` (warm-up from 0);
    * ``c + (1 - c) (1 + cos(pi (t - W) / C)) / 2`` for ``W <= t < W + C`` (1 at ``t = W``);
    * ``c`` from ``W + C`` until ``S`` (the constant phase, of any length);
    * ``c (m / c)^((t - S) / A)`` for ``S <= t < S + A``, and ``m`` from ``S + A`` on.

    ``S`` is ``anneal_start``, or ``max_steps - A`` when it is None (annealing ends the run);
    with ``A = 0`` the rate stays at ``c`` for ever and ``max_steps`` is never needed.
    """
    Schedule.check_progress("infinite_lr_schedule", step, max_steps)
    if step < warmup_steps:
        return step / warmup_steps
    t = step - warmup_steps
    if t < cooldown_steps:
        return constant_lr + (1.0 - constant_lr) * 0.5 * (1.0 + math.cos(math.pi * t / cooldown_steps))
    if anneal_steps == 0:
        return constant_lr
    start = anneal_start
    if start is None:
        if max_steps is None:
            raise ConfigError("infinite_lr_schedule: annealing at the end of the run needs its "
                              "length (max_steps), or set anneal_start", param="max_steps")
        start = max_steps - anneal_steps
        if start < warmup_steps + cooldown_steps:
            raise ConfigError(f"infinite_lr_schedule: max_steps={max_steps} leaves no room for "
                              f"{warmup_steps} warm-up, {cooldown_steps} cooldown and "
                              f"{anneal_steps} anneal steps", param="max_steps")
    if step < start:
        return constant_lr
    done = min(1.0, (step - start) / anneal_steps)
    return constant_lr * (min_lr / constant_lr) ** done


class InfiniteLRSchedule(Schedule):
    """:func:`infinite_lr` as a Schedule (a multiplier of the optimizer's rate, which is the
    peak rate ``eta_max``). A pure function of the step, so a resumed run continues inside
    any phase exactly."""

    def __init__(self, warmup_steps: Annotated[int, _STEPS] = 0,
                 cooldown_steps: Annotated[int, _STEPS] = 0,
                 constant_lr: Annotated[float, _LEVEL] = 0.5,
                 min_lr: Annotated[float, _LEVEL] = 0.01,
                 anneal_steps: Annotated[int, _STEPS] = 0,
                 anneal_start: Annotated[int, _STEPS] | None = None):
        if min_lr > constant_lr:
            raise ConfigError(f"infinite_lr_schedule: min_lr ({min_lr}) must not exceed "
                              f"constant_lr ({constant_lr})", param="min_lr")
        if anneal_start is not None and anneal_start < warmup_steps + cooldown_steps:
            raise ConfigError(f"infinite_lr_schedule: anneal_start ({anneal_start}) falls before the "
                              f"end of warm-up and cooldown ({warmup_steps + cooldown_steps})",
                              param="anneal_start")
        self.warmup_steps, self.cooldown_steps = warmup_steps, cooldown_steps
        self.constant_lr, self.min_lr = constant_lr, min_lr
        self.anneal_steps, self.anneal_start = anneal_steps, anneal_start

    def __call__(self, step: int, max_steps: int | None = None) -> float:
        return infinite_lr(step, max_steps, warmup_steps=self.warmup_steps,
                           cooldown_steps=self.cooldown_steps, constant_lr=self.constant_lr,
                           min_lr=self.min_lr, anneal_steps=self.anneal_steps,
                           anneal_start=self.anneal_start)


CARD = Card(
    name="infinite_lr_schedule", kind="schedule",
    title="Beyond Cosine Decay: On the effectiveness of Infinite Learning Rate Schedule for "
          "Continual Pre-training",
    paper="arXiv:2503.02844",
    summary="LR multiplier without a fixed budget: linear warm-up, one cosine cooldown to a "
            "constant rate held indefinitely, and an optional short exponential anneal to "
            "min_lr before a checkpoint.",
    formula="f(t) = t / W (t < W); c + (1 - c)(1 + cos(pi (t - W) / C)) / 2 (W <= t < W + C); "
            "c (W + C <= t < S); c (m / c)^min(1, (t - S) / A) (t >= S), with S = anneal_start or "
            "max_steps - A (W warmup_steps, C cooldown_steps, c constant_lr, m min_lr, "
            "A anneal_steps; multipliers of the peak rate eta_max)",
    left_out="The paper tunes phase lengths and eta_const per experiment and reports no single "
             "setting: the defaults here (no warm-up or cooldown, c = 0.5, m = 0.01, no "
             "annealing) are ours. Repeated anneals from saved constant-phase checkpoints are "
             "separate runs (resume a constant-phase checkpoint with anneal_start set).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(InfiniteLRSchedule, card=CARD)
