"""Quantised training without full-precision master weights: after every optimizer step the
weights are rounded onto the quantisation grid, and the rounding error is injected into the
optimizer's momentum so that its future steps restore it.

Nikdan, Zandieh, Alistarh & Mirrokni, "ECO: Quantized Training without Full-Precision Master
Weights", 2026 (arXiv:2601.22101): the error-feedback step for SGD with momentum.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import annotated_types
import torch
from torch import Tensor

from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.quantization import Grid, stochastic_round


def injection_coefficient(lr: float, momentum: float) -> float:
    """``c = (1 - beta) / (lr beta)``: with torch's SGD (``m <- beta m + (1 - d) g``,
    ``w <- w - lr m``) a momentum change of ``-c e`` moves the weights by
    ``lr c e (beta + beta^2 + ...) = lr c e beta / (1 - beta) = e`` over the following steps."""
    return (1.0 - momentum) / (lr * momentum)


def adam_injection_coefficient(lr: float, beta1: float, beta2: float, eps: float, step: int,
                               exp_avg_sq: Tensor) -> Tensor:
    """The elementwise ``c`` for torch's Adam / AdamW (first moment ``m <- beta1 m + (1 -
    beta1) g``, step ``lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)``): a change
    ``-c e`` of ``m`` returns ``e`` over the following steps when the second moment and the bias
    corrections stay at their values of the next step, ``c = (1 - beta1) (1 - beta1^(t+1))
    (sqrt(v / (1 - beta2^t)) + eps) / (lr beta1)``."""
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps
    return (1 - beta1) * (1 - beta1 ** (step + 1)) * denom / (lr * beta1)


def eco_step(param: Tensor, buf: Tensor, quantize: Any, coefficient: float | Tensor) -> Tensor:
    """In place: ``w_hat = q(w~)``, ``e = w~ - w_hat``, ``param <- w_hat``,
    ``buf <- buf - c e``; returns ``e``."""
    with torch.no_grad():
        target = param.detach().clone()
        rounded = quantize(target)
        error = target - rounded
        param.copy_(rounded)
        buf.sub_(coefficient * error)
    return error


class ECOErrorCompensatedQuantized(Callback):
    """At ``after_optimizer_step``, for every parameter of the optimizer with at least
    ``min_dim`` dimensions (weight matrices and kernels; biases stay in full precision): round
    it onto its grid (``bits``-bit per-channel, or per-group with ``group_size``, fitted to the
    stepped weights; or, with ``grid_step``, the fixed grid of multiples of ``grid_step``) by
    round-to-nearest or stochastic rounding, and subtract ``c e`` from its momentum buffer
    (:func:`injection_coefficient`, ``lr`` the group's current rate; with Adam or AdamW the
    first moment, :func:`adam_injection_coefficient`). The optimizer must be
    ``torch.optim.SGD`` with momentum in (0, 1) and no Nesterov, or ``torch.optim.Adam`` /
    ``AdamW`` with beta1 in (0, 1) (no AMSGrad). After each step the quantised
    weights are exactly on the grid (``last_grids`` holds the grids of the last step); the
    stochastic rounding's generator state is checkpointed."""

    def __init__(self, bits: Annotated[int, annotated_types.Interval(ge=2, le=16)] = 8,
                 symmetric: bool = True,
                 group_size: Annotated[int, annotated_types.Ge(1)] | None = None,
                 grid_step: Annotated[float, annotated_types.Gt(0)] | None = None,
                 rounding: Annotated[str, one_of(("nearest", "stochastic"))] = "nearest",
                 min_dim: Annotated[int, annotated_types.Ge(1)] = 2, seed: int = 0):
        self.bits, self.symmetric, self.group_size = bits, symmetric, group_size
        self.grid_step, self.rounding, self.min_dim = grid_step, rounding, min_dim
        self.generator = torch.Generator().manual_seed(seed)
        self.last_grids: dict[int, Grid] = {}

    def _check(self, optimizer: Any) -> None:
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            for group in optimizer.param_groups:
                if not 0 < group["betas"][0] < 1 or group["amsgrad"]:
                    raise ConfigError("callback 'eco_error_compensated_quantized' needs Adam's beta1 in "
                                      f"(0, 1) without AMSGrad, got betas={group['betas']}, "
                                      f"amsgrad={group['amsgrad']}", param="betas")
            return
        if not isinstance(optimizer, torch.optim.SGD):
            raise ConfigError(f"callback 'eco_error_compensated_quantized' injects the error into the "
                              f"momentum of SGD, Adam or AdamW; got {type(optimizer).__name__}",
                              param="optimizer")
        for group in optimizer.param_groups:
            if not 0 < group["momentum"] < 1 or group["nesterov"]:
                raise ConfigError("callback 'eco_error_compensated_quantized' needs SGD momentum in "
                                  f"(0, 1) without Nesterov, got momentum={group['momentum']}, "
                                  f"nesterov={group['nesterov']}", param="momentum")

    def on_fit_start(self, state: Any) -> None:
        self._check(state.optimizer)

    def quantize(self, w: Tensor, key: int) -> Tensor:
        """``w`` on its grid (records the grid under ``key``)."""
        if self.grid_step is not None:
            x = w / self.grid_step
            codes = torch.round(x) if self.rounding == "nearest" else stochastic_round(x, self._gen(w))
            return codes * self.grid_step
        grid = Grid.fit(w, self.bits, symmetric=self.symmetric, group_size=self.group_size)
        self.last_grids[key] = grid
        return grid.round(w, self.rounding, self._gen(w))

    def _gen(self, w: Tensor) -> torch.Generator | None:
        return self.generator if w.device.type == "cpu" else None

    def after_optimizer_step(self, state: Any) -> None:
        optimizer = state.optimizer
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dim() < self.min_dim or p.grad is None:
                    continue
                quantize = functools.partial(self.quantize, key=id(p))
                state_p = optimizer.state[p]
                if "exp_avg" in state_p:  # Adam / AdamW
                    beta1, beta2 = group["betas"]
                    c = adam_injection_coefficient(group["lr"], beta1, beta2, group["eps"],
                                                   int(state_p["step"]), state_p["exp_avg_sq"])
                    eco_step(p, state_p["exp_avg"], quantize, c)
                    continue
                buf = state_p.get("momentum_buffer")
                if buf is None:
                    self._check(optimizer)
                    continue
                eco_step(p, buf, quantize, injection_coefficient(group["lr"], group["momentum"]))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


CARD = Card(
    name="eco_error_compensated_quantized", kind="callback",
    title="ECO: Quantized Training without Full-Precision Master Weights",
    paper="arXiv:2601.22101",
    summary="Weights live on the quantisation grid after every step (no master copy); the "
            "rounding error is fed back through SGD's momentum so small updates are not lost.",
    formula="w~ = w_hat - lr m (the optimizer's step); w_hat' = q(w~); e = w~ - w_hat'; "
            "m <- m - c e, c = (1 - beta) / (lr beta) for SGD momentum, so sum_k lr beta^k c e = e; "
            "Adam: c = (1 - b1)(1 - b1^(t+1))(sqrt(v / (1 - b2^t)) + eps) / (lr b1)",
    left_out="FP8 / INT4 kernels: the grid is emulated in the weights' dtype (uniform "
             "per-channel or per-group integer grids, or a fixed step). The Adam coefficient is "
             "our derivation (second moment and bias corrections frozen at the next step's), "
             "exact for SGD momentum only. "
             "Defaults (8 bits, symmetric per channel, round to nearest) are ours; the paper "
             "uses FP8 (pre-training) and INT4 (fine-tuning) with stochastic rounding as its best.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ECOErrorCompensatedQuantized, card=CARD)
