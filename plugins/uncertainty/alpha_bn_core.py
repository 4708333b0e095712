"""alpha-BN and Core: test-time batch statistics calibration for covariate shift.

You, Li and Zhao, "Test-time Batch Statistics Calibration for Covariate Shift",
arXiv:2110.04065 (2021). alpha-BN normalises every BatchNorm layer with the source (running)
statistics mixed into the test batch's; Core adds, per test batch, an online step on the BN
layers' scale and shift that descends a pairwise class-correlation loss.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn
from torch.nn import functional as F

from sdk.adaptation import batch_moments, batch_norm_layers
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Adapter
from sdk.types import Batch

_NAME = "alpha_bn_core"


def alpha_moments(source_mean: Tensor, source_var: Tensor, mean: Tensor, var: Tensor,
                  alpha: float) -> tuple[Tensor, Tensor]:
    """alpha-BN's statistics: ``mu = alpha mu_s + (1 - alpha) mu_t`` and
    ``sigma^2 = alpha sigma_s^2 + (1 - alpha) sigma_t^2`` (``alpha = 1``: the source BN,
    ``alpha = 0``: test-batch BN)."""
    return (alpha * source_mean.to(mean) + (1 - alpha) * mean,
            alpha * source_var.to(var) + (1 - alpha) * var)


def core_loss(logits: Tensor) -> Tensor:
    """Core's pairwise class-correlation loss on ``P = softmax(z)`` ``[B, C]``:
    ``A = P^T P``, ``L = -1/C sum_c log(A_cc / sum_c' A_cc')``.

    Rows of ``P`` sum to one, so ``sum_c' A_cc' = sum_i p_ic``; both sums are taken in log
    space (``logsumexp`` of ``2 log p_ic`` and of ``log p_ic``) so that a class with
    vanishing probabilities gives a large finite loss, not ``log 0``."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ShapeError(f"adapter {_NAME!r}: the model's outputs must be logits [B, C] with C >= 2, "
                         f"got {list(logits.shape)}")
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    log_p = z.log_softmax(1)
    return -(torch.logsumexp(2 * log_p, 0) - torch.logsumexp(log_p, 0)).mean()


class AlphaBNCore(Adapter):
    """Every BN layer (kept in eval mode, its running buffers untouched) normalises the test
    batch with :func:`alpha_moments` of its running statistics and the batch's per-channel
    moments (biased variance, gradients flow through them as in training-mode BN). With
    ``steps = 0`` that is alpha-BN alone, no gradient; with ``steps >= 1`` (Core) every
    parameter is frozen but the BN layers' weight and bias, and each batch gets ``steps``
    optimizer steps (Adam by default, or SGD with ``momentum``) on :func:`core_loss`; the
    returned outputs are those of the forward the (last) step was computed on. ``reset()``
    restores the model and drops the optimizer's moments."""

    def __init__(self, alpha: Annotated[float, Interval(ge=0, le=1)] = 0.1,
                 steps: Annotated[int, Ge(0)] = 1, lr: Annotated[float, Gt(0)] = 1e-3,
                 optimizer: Annotated[str, one_of(("adam", "sgd"))] = "adam",
                 momentum: Annotated[float, Ge(0)] = 0.9):
        super().__init__()
        self.alpha, self.steps, self.lr = alpha, steps, lr
        self.optimizer, self.momentum = optimizer, momentum
        self._opt: torch.optim.Optimizer | None = None

    def _configure(self, model: nn.Module, layers: list[nn.Module]) -> None:
        params = [p for m in layers for p in (m.weight, m.bias) if p is not None]
        if not params:
            raise ConfigError(f"adapter {self.name!r}: the model's BatchNorm layers have no affine "
                              "parameters (affine=False) for Core to adapt; steps=0 is alpha-BN "
                              "alone", param="model")
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self._opt = (torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999)) if self.optimizer == "adam"
                     else torch.optim.SGD(params, lr=self.lr, momentum=self.momentum))

    def _normalise(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        (h,) = args
        if self.alpha == 0 and h.dim() >= 2 and h.numel() == h.shape[1]:
            raise ShapeError(f"adapter {self.name!r}: with alpha = 0 a batch of one row with no "
                             f"spatial positions gives BatchNorm one value per channel (input "
                             f"{list(h.shape)}); adapt on batches of two or more or take alpha > 0")
        mean, var = batch_moments(h, f"adapter {self.name!r}")
        mu, sigma2 = alpha_moments(module.running_mean, module.running_var, mean, var, self.alpha)
        if not torch.is_grad_enabled():  # alpha-BN alone: BatchNorm's own kernel
            return F.batch_norm(h.to(mu.dtype), mu, sigma2, module.weight, module.bias, False, 0.0,
                                module.eps).to(output.dtype)
        # Core differentiates through the batch's moments, which F.batch_norm refuses to do
        shape = (1, -1) + (1,) * (h.dim() - 2)
        y = (h.to(mu.dtype) - mu.view(shape)) * torch.rsqrt(sigma2 + module.eps).view(shape)
        if module.weight is not None:
            y = y * module.weight.view(shape) + module.bias.view(shape)
        return y.to(output.dtype)

    def _forward(self, model: nn.Module, x: Tensor, layers: list[nn.Module]) -> Tensor:
        hooks = [m.register_forward_hook(self._normalise) for m in layers]
        try:
            return model(x)
        finally:
            for hook in hooks:
                hook.remove()

    def forward(self, model: nn.Module, x: Tensor, batch: Batch) -> Tensor:
        layers = batch_norm_layers(model, f"adapter {self.name!r}", running_stats=True)
        for m in layers:
            m.eval()
        if self.steps == 0:
            with torch.no_grad():
                return self._forward(model, x, layers)
        if self._opt is None:
            self._configure(model, layers)
        for _ in range(self.steps):
            with torch.enable_grad():
                out = self._forward(model, x, layers)
                core_loss(out).backward()
            self._opt.step()
            self._opt.zero_grad()
        return out.detach()

    def reset(self) -> None:
        self._opt = None
        super().reset()


CARD = Card(
    name=_NAME, kind="adapter",
    title="Test-time Batch Statistics Calibration for Covariate Shift",
    paper="arXiv:2110.04065",
    summary="alpha-BN: each BatchNorm layer normalises a test batch with its source statistics "
            "mixed into the batch's (alpha = 0.1 of source), which corrects the covariate shift "
            "while keeping part of the structure the source statistics give the affine "
            "parameters; Core: one online Adam step per batch on the BN scale and shift, "
            "descending a pairwise class-correlation loss (steps=0 is alpha-BN alone).",
    formula="mu = alpha mu_s + (1 - alpha) mu_t, sigma^2 = alpha sigma_s^2 + (1 - alpha) sigma_t^2, "
            "BN(h) = gamma (h - mu) / sqrt(sigma^2 + eps) + beta; Core: P = softmax(f(x)), "
            "A = P^T P, L = -1/C sum_c log(A_cc / sum_c' A_cc'), min over (gamma, beta)",
    left_out="The paper's full text could not be consulted here: the direction of alpha (alpha "
             "weighs the source statistics, alpha = 1 is source BN) follows the abstract's "
             "framing and the brief's tests, the default alpha = 0.1 and the Core loss in the "
             "form above are the seed catalogue's reading, and Core's optimizer (Adam, lr 1e-3, "
             "one step per batch; optimizer='sgd' for SGD) is Tent's setting, not a value taken "
             "from the paper. The test batch's variance is the biased one. Only BatchNorm layers "
             "are calibrated (the semantic-segmentation experiments' networks are not here).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AlphaBNCore, card=CARD)
