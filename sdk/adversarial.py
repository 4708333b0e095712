"""Adversarial examples for adversarial training and robustness metrics: projected gradient
descent in an L-infinity ball (Madry et al. 2018) and the fast gradient sign method (Goodfellow
et al. 2015), as functions and as a :class:`~sdk.interfaces.Transform` that calls back into the
model being trained.

The attack differentiates the loss with respect to the input only (``torch.autograd.grad`` on
the perturbed input): no gradient reaches the model's parameters (their ``.grad`` is untouched),
and the model runs in evaluation mode during the attack (BatchNorm's running statistics are not
updated by the attack's forward passes; dropout is off), its modes restored afterwards. Under the
Trainer's autocast the attack's forwards run in the autocast dtype; the returned examples have
the input's dtype and are detached.

:func:`reverse_gradient` is the gradient-reversal layer of minimax training within one
optimizer (Ganin & Lempitsky 2015): the identity forward, ``-scale`` times the gradient backward,
so parameters before it ascend the loss that the parameters after it descend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.interfaces import Transform
from sdk.types import Batch

Loss = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets)


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    """``x`` forward; ``-scale * grad`` backward (the gradient-reversal layer)."""
    return _ReverseGradient.apply(x, scale)


class _EvalMode:
    """Every module of ``model`` in evaluation mode inside the block, modes restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, mode in zip(self.model.modules(), self.modes):
            module.training = mode


def pgd(model: nn.Module, x: Tensor, targets: Tensor, *, eps: float, step_size: float, steps: int,
        loss: Loss | None = None, random_start: bool = True,
        clip: tuple[float, float] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``steps`` steps of ``x' <- proj(x' + step_size sign(grad_x' loss(model(x'), targets)))``,
    ``proj`` onto ``||x' - x||_inf <= eps`` (and ``clip``, the inputs' valid range, when given),
    from ``x`` plus uniform noise in the ball when ``random_start``. ``loss`` (default:
    cross-entropy of the outputs as logits against class ids) is maximised. Detached result."""
    if eps < 0 or step_size < 0 or steps < 0:
        raise ConfigError(f"pgd: eps, step_size and steps must be >= 0, got {eps}, {step_size}, {steps}")
    loss = loss or _cross_entropy
    x0 = x.detach()
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=generator, device="cpu" if generator else x0.device)
        x_adv = x0 + eps * (2 * noise.to(x0) - 1)
    else:
        x_adv = x0.clone()
    if clip is not None:
        x_adv = x_adv.clamp(*clip)
    with _EvalMode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(loss(model(x_adv), targets), x_adv)
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps)
                if clip is not None:
                    x_adv = x_adv.clamp(*clip)
    return x_adv.detach().to(x.dtype)


def fgsm(model: nn.Module, x: Tensor, targets: Tensor, *, eps: float, loss: Loss | None = None,
         clip: tuple[float, float] | None = None) -> Tensor:
    """``x + eps sign(grad_x loss)`` (clipped to ``clip``): one PGD step of size ``eps`` from ``x``."""
    return pgd(model, x, targets, eps=eps, step_size=eps, steps=1, loss=loss, random_start=False, clip=clip)


class AdversarialExamples(Transform):
    """A view of PGD adversarial examples of the model being trained: ``eps`` (the L-inf
    radius), ``step_size`` (default ``eps / 4``), ``steps`` (1 with ``random_start=False`` and
    ``step_size = eps`` is FGSM), ``clip`` (the inputs' range). Needs class ids in
    ``Batch.targets``. The model is the Trainer's encoder, taken at ``on_fit_start``, or given
    with :meth:`attach` (it is held by reference, not as a submodule: its parameters are not the
    transform's)."""

    def __init__(self, eps: float = 8 / 255, step_size: float | None = None, steps: int = 10,
                 random_start: bool = True, clip: tuple[float, float] | None = (0.0, 1.0),
                 seed: int | None = None):
        super().__init__()
        if eps < 0 or steps < 0 or (step_size is not None and step_size < 0):
            raise ConfigError(f"AdversarialExamples: eps, step_size and steps must be >= 0, got "
                              f"{eps}, {step_size}, {steps}", param="eps")
        self.eps, self.steps, self.random_start, self.clip = eps, steps, random_start, clip
        self.step_size = eps / 4 if step_size is None else step_size
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.__dict__["_model"] = None  # a reference, outside nn.Module's registry

    def attach(self, model: nn.Module) -> AdversarialExamples:
        self.__dict__["_model"] = model
        return self

    def on_fit_start(self, state: Any) -> None:
        if self.__dict__["_model"] is None:
            self.attach(state.trainer.encoder)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        model = self.__dict__["_model"]
        if model is None:
            raise RequirementError("transform 'adversarial_examples' has no model: attach(model) "
                                   "or use it inside a Trainer")
        t = batch.targets
        if t is None or t.shape != (x.shape[0],) or t.is_floating_point():
            shape = None if t is None else list(t.shape)
            raise ShapeError(f"transform 'adversarial_examples' needs class ids Batch.targets "
                             f"[{x.shape[0]}], got {shape}")
        return pgd(model, x, t, eps=self.eps, step_size=self.step_size, steps=self.steps,
                   random_start=self.random_start, clip=self.clip, generator=self.generator), batch
