"""Linear warm-up, then cosine annealing to a floor: the learning-rate multiplier most
large-batch and self-supervised recipes use.

Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017
(cosine annealing, one cycle without restarts); Goyal et al., "Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour", 2017 (gradual linear warm-up).
"""

from __future__ import annotations

import math
from typing import Annotated

import annotated_types

from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Schedule

_FRACTION = annotated_types.Interval(ge=0, le=1)


def cosine_warmup(step: int, max_steps: int | None, *, warmup_steps: int = 0,
                  min_lr: float = 0.0, start_factor: float = 0.0) -> float:
    """The multiplier at ``step``: ``start_factor`` rising linearly to 1 over ``warmup_steps``,
    then ``min_lr + (1 - min_lr) (1 + cos(pi p)) / 2`` with ``p`` the fraction of the steps
    after warm-up done (1 from ``max_steps`` on). A negative ``step`` or a ``max_steps`` below 1
    raises :class:`sdk.ConfigError`."""
    Schedule.check_progress("cosine_warmup", step, max_steps)
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if step == warmup_steps:
        return 1.0
    if max_steps is None:
        raise ConfigError(f"cosine_warmup: step {step} is past the warm-up, and the cosine needs "
                          "the run's length (max_steps): give the trainer max_steps or max_epochs",
                          param="max_steps")
    done = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (1.0 - min_lr) * 0.5 * (1.0 + math.cos(math.pi * done))


class CosineWarmup(Schedule):
    """:func:`cosine_warmup` as a Schedule (an LR multiplier of the optimizer step)."""

    def __init__(self, warmup_steps: Annotated[int, annotated_types.Ge(0)] = 0,
                 min_lr: Annotated[float, _FRACTION] = 0.0,
                 start_factor: Annotated[float, _FRACTION] = 0.0):
        self.warmup_steps, self.min_lr, self.start_factor = warmup_steps, min_lr, start_factor

    def __call__(self, step: int, max_steps: int | None = None) -> float:
        return cosine_warmup(step, max_steps, warmup_steps=self.warmup_steps, min_lr=self.min_lr,
                             start_factor=self.start_factor)


CARD = Card(
    name="cosine_warmup", kind="schedule",
    title="SGDR: Stochastic Gradient Descent with Warm Restarts (cosine annealing), with the "
          "linear warm-up of Goyal et al. 2017",
    paper="arXiv:1608.03983",
    summary="LR multiplier: linear warm-up from start_factor to 1 over warmup_steps, then one "
            "cosine from 1 down to min_lr at the last step.",
    formula="f(t) = s + (1 - s) t / W for t < W; f(t) = m + (1 - m) (1 + cos(pi min(1, (t - W) / "
            "(T - W)))) / 2 for t >= W (W warmup_steps, T max_steps, m min_lr, s start_factor)",
    left_out="Warm restarts (SGDR's cycles): one cosine per run.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CosineWarmup, card=CARD)
