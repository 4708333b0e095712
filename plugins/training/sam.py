"""Sharpness-aware minimisation: step with the gradient taken at the worst nearby weights.

Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021 (Algorithm 1, p = 2).
"""

from __future__ import annotations

from typing import Annotated, Any

import annotated_types
import torch

from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback


class SAM(Callback):
    """At ``before_optimizer_step`` (gradients ``g`` of the step ready): move every parameter
    the optimizer holds to ``w + e``, ``e = rho g / ||g||_2`` (the norm over all of them),
    recompute the step's loss and gradient there (``trainer.recompute_gradients()``: same
    batch and views, buffers untouched), and put the weights back to ``w``; the optimizer then
    steps from ``w`` with the gradient taken at ``w + e``. Any optimizer is the base optimizer.
    """

    def __init__(self, rho: Annotated[float, annotated_types.Ge(0)] = 0.05):
        self.rho = rho

    def on_fit_start(self, state: Any) -> None:
        """Refuse, before any step, a run whose gradient SAM cannot recompute."""
        trainer = state.trainer
        if trainer.accumulate != 1:
            raise ConfigError(f"callback 'sam' needs accumulate=1 (it recomputes one micro-batch's "
                              f"gradient), got accumulate={trainer.accumulate}", param="accumulate")
        if trainer.precision == "fp16-mixed":
            raise ConfigError("callback 'sam' does not support precision 'fp16-mixed' (its "
                              "GradScaler unscales once per step); use 'bf16-mixed'", param="precision")

    def before_optimizer_step(self, state: Any) -> None:
        params = [p for group in state.optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            scale = self.rho / (norm + 1e-12)
            weights = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * scale.to(p.grad.dtype))
        state.trainer.recompute_gradients()
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)


CARD = Card(
    name="sam", kind="callback",
    title="Sharpness-Aware Minimization for Efficiently Improving Generalization",
    paper="arXiv:2010.01412",
    summary="Two forward/backward passes per step: the gradient is taken at the weights moved "
            "by rho along the normalised gradient, and applied at the original weights.",
    formula="e = rho g / ||g||_2, g = grad L(w); w <- w - lr * base_update(grad L(w + e))",
    left_out="Adaptive SAM (ASAM's scale-invariant neighbourhood), p != 2, and m-sharpness "
             "with m below the batch: e comes from the gradient of the whole (global) batch. "
             "Needs accumulate=1 and no fp16 GradScaler.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SAM, card=CARD)
