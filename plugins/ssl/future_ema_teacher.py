"""Future-self-training (FST-D): the momentum teacher that labels the current batch is the one a
few virtual optimizer steps of the student would lead to.

Du, Shen, Wang, Fei, Li, Wu, Zhao, Fu & Liu, "Learning from Future: A Novel Self-Training
Framework for Semantic Segmentation", NeurIPS 2022 (arXiv:2209.06993); the order of the updates
and the defaults (``K = 3`` steps ahead, momentum 0.999) follow the authors' code
(github.com/usr922/FST, ``mmseg/models/uda/fst_d.py`` and its ``step3`` configurations).

At optimizer step ``t``, with student ``theta_t`` and teacher ``phi`` (which has absorbed
``theta_t``), and ``g(theta, phi)`` the gradient of the loss on the current batch when ``phi``
produces the targets::

    theta^0 = theta_t
    for k = 1 .. K:   theta^k = step(theta^{k-1}, g(theta^{k-1}, phi));  phi <- m phi + (1 - m) theta^k
    theta_{t+1} = step(theta_t, g(theta_t, phi))        (the student rolled back, the teacher not)
    phi <- m phi + (1 - m) theta_{t+1}                  (the ordinary EMA update)

With ``K = 0`` this is the plain EMA (mean) teacher.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import nn

from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.momentum import EMATeacher

OWNER = "teacher 'future_ema_teacher'"


class FutureEMATeacher(EMATeacher):
    """An EMA teacher (``theta_t <- m theta_t + (1 - m) theta_s``, constant ``m`` by default)
    that, listening to ``before_optimizer_step``, looks ``steps`` virtual optimizer steps ahead
    (see the module docstring): each virtual step applies the optimizer to the gradient at the
    virtual student, the teacher absorbs the result, and the gradient is recomputed on the same
    batch and views (``Trainer.recompute_gradients``: the teacher encodes the views again);
    then every parameter the optimizer holds is put back, and the gradient at the real
    student, with the future teacher's targets, is what the optimizer applies.

    ``restore_optimizer``: the optimizer's state (momenta, Adam's moments and step counts) is put
    back as well, so the virtual steps leave no trace in the student (the paper's virtual
    optimisation); False keeps the state the virtual steps advanced, as the authors' code
    does. Needs ``accumulate=1`` and no fp16 GradScaler (the gradient is recomputed on one
    micro-batch)."""

    def __init__(self, student: nn.Module | None = None,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.999,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.999,
                 steps: Annotated[int, Ge(0)] = 3, restore_optimizer: bool = True):
        super().__init__(student=student, momentum=momentum, final_momentum=final_momentum)
        self.steps, self.restore_optimizer = steps, restore_optimizer

    def on_fit_start(self, state: Any) -> None:
        """Refuse, before any step, a run whose gradient cannot be recomputed."""
        trainer = state.trainer
        if self.steps and trainer.accumulate != 1:
            raise ConfigError(f"{OWNER} needs accumulate=1 (its virtual steps recompute one "
                              f"micro-batch's gradient), got accumulate={trainer.accumulate}",
                              param="accumulate")
        if self.steps and trainer.precision == "fp16-mixed":
            raise ConfigError(f"{OWNER} does not support precision 'fp16-mixed' (its GradScaler "
                              "unscales once per step); use 'bf16-mixed'", param="precision")

    def before_optimizer_step(self, state: Any) -> None:
        if not self.steps:
            return
        optimizer, trainer = state.optimizer, state.trainer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            weights = [p.detach().clone() for p in params]
            saved = ({p: {k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in optimizer.state[p].items()}
                      for p in params if p in optimizer.state}
                     if self.restore_optimizer else None)
        for k in range(self.steps):
            optimizer.step()
            self.update(student=trainer.encoder, step=state.step, max_steps=trainer.total_steps)
            if k + 1 < self.steps:
                trainer.recompute_gradients()
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
            if saved is not None:
                for p in params:
                    optimizer.state.pop(p, None)
                optimizer.state.update(saved)
        trainer.recompute_gradients()


CARD = Card(
    name="future_ema_teacher", kind="teacher",
    title="Learning from Future: A Novel Self-Training Framework for Semantic Segmentation",
    paper="arXiv:2209.06993",
    summary="A momentum teacher that labels the current batch after absorbing K virtual "
            "optimizer steps of the student on it (FST-D); the student is rolled back and "
            "learns from that future teacher.",
    formula="theta^0 = theta_t; for k = 1..K: theta^k = step(theta^{k-1}, grad L(theta^{k-1}; "
            "phi)), phi <- m phi + (1 - m) theta^k; theta_{t+1} = step(theta_t, grad L(theta_t; "
            "phi)); phi <- m phi + (1 - m) theta_{t+1}",
    left_out="FST-W (the teacher updated with an average of virtual students from different "
             "batches) is not implemented; the segmentation model, the class-mix and the "
             "pseudo-label threshold of the paper are the recipe's (any objective reading "
             "Views.extras['teacher'] learns from the future teacher). The teacher keeps the "
             "virtual updates (K + 1 EMA updates per step, as the authors' code). The "
             "momentum is constant (0.999, the authors'; their ramp min(1 - 1/(t + 1), m) in "
             "the first steps is not applied; final_momentum gives the cosine schedule "
             "instead). The virtual steps use the unclipped gradient and the current learning "
             "rate; by default the optimizer's state is restored with the weights "
             "(restore_optimizer=False: the authors' code, which restores only the weights). "
             "Needs accumulate=1 and no fp16 GradScaler.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FutureEMATeacher, card=CARD)
