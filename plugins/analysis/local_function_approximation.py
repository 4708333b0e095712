"""Local function approximation (LFA) loss: how faithfully an explanation's linear model matches
the model in a neighbourhood.

Han, Srinivas, Lakkaraju, "Which Explanation Should I Choose? A Function Approximation
Perspective to Characterizing Post Hoc Explanations", NeurIPS 2022 (arXiv:2206.01254). An
explanation ``w`` of ``f`` at ``x0`` is the interpretable model ``g(z) = w^T z (+ b)`` over
perturbations ``z ~ Z`` that map to inputs ``x(z)``; its LFA loss is ``E_{z~Z} l(f, g, x0, z)``.
The neighbourhoods of the authors' code: Gaussian ``x = x0 + z``, ``z ~ N(0, sigma^2 I)``
(SmoothGrad, C-LIME; sigma -> 0: vanilla gradients), binary ``x = x0 * z``, ``z ~ Bernoulli(1/2)``
(LIME, KernelSHAP), uniform ``x = alpha x0``, ``z = alpha 1``, ``alpha ~ U(low, 1)``
(Integrated Gradients; low -> 1: gradient x input). The losses: squared,
``1/2 (f(x(z)) - g(z))^2``, and gradient matching, ``||grad_z f(x(z)) - grad_z g(z)||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk.card import Card
from sdk.constraints import check, declared, one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import nan_if_any_nan

_NAME = "local_function_approximation"
_STAT = torch.float64
_NEIGHBOURHOODS = ("gaussian", "binary", "uniform")
_LOSSES = ("squared", "gradient_matching")


def perturb(x0: Tensor, neighbourhood: Annotated[str, one_of(_NEIGHBOURHOODS)] = "gaussian",
            n_samples: Annotated[int, Ge(1)] = 1000, sigma: Annotated[float, Gt(0)] = 0.1,
            low: Annotated[float, Interval(ge=0, lt=1)] = 0.0, generator: torch.Generator | None = None
            ) -> tuple[Tensor, Tensor]:
    """``(z, x)``, both ``[N, S, D]``: ``S = n_samples`` draws of the interpretable perturbation
    ``z`` around each row of ``x0 [N, D]`` and the inputs ``x(z)`` they stand for (see the
    module docstring; ``sigma`` is the Gaussian's standard deviation, ``low`` the uniform's lower
    bound)."""
    check(_NAME, declared(perturb), {"neighbourhood": neighbourhood, "n_samples": n_samples,
                                     "sigma": sigma, "low": low})
    if x0.dim() != 2 or not x0.is_floating_point():
        raise ShapeError(f"{_NAME}: x0 must be floating [N, D], got {x0.dtype} {list(x0.shape)}")
    n, d = x0.shape
    opts = {"generator": generator, "dtype": x0.dtype, "device": x0.device}
    if neighbourhood == "gaussian":
        z = sigma * torch.randn(n, n_samples, d, **opts)
        return z, x0[:, None] + z
    if neighbourhood == "binary":
        z = torch.bernoulli(torch.full((n, n_samples, d), 0.5, dtype=x0.dtype, device=x0.device),
                            generator=generator)
        return z, x0[:, None] * z
    alpha = low + (1 - low) * torch.rand(n, n_samples, 1, **opts)       # uniform
    return alpha.expand(n, n_samples, d), alpha * x0[:, None]


def responses(model: Callable[[Tensor], Tensor], x0: Tensor, x: Tensor, target: Tensor,
              neighbourhood: Annotated[str, one_of(_NEIGHBOURHOODS)] = "gaussian",
              loss: Annotated[str, one_of(_LOSSES)] = "squared") -> Tensor:
    """What the loss compares ``g`` with: the target logit ``f_t(x(z))`` ``[N, S]`` (squared) or
    its gradient in ``z`` ``[N, S, D]`` (gradient matching: ``grad_x f_t`` for the Gaussian,
    ``x0 * grad_x f_t`` for the multiplicative neighbourhoods); ``model`` maps ``[M, D]`` to
    ``[M, C]`` and ``target [N]`` holds each row's explained class."""
    check(_NAME, declared(responses), {"neighbourhood": neighbourhood, "loss": loss})
    if x.dim() != 3 or x0.shape != (x.shape[0], x.shape[2]):
        raise ShapeError(f"{_NAME}: x must be perturbed inputs [N, S, D] of x0 [N, D], got "
                         f"{list(x.shape)} for x0 {list(x0.shape)}")
    n, s, d = x.shape
    if target.shape != (n,) or target.is_floating_point():
        raise ShapeError(f"{_NAME}: target must be [{n}] class ids, got {target.dtype} {list(target.shape)}")
    rows = target.to(x.device).long().repeat_interleave(s)[:, None]
    if loss == "squared":
        with torch.no_grad():
            return model(x.reshape(n * s, d)).gather(1, rows).reshape(n, s)
    flat = x.detach().reshape(n * s, d).requires_grad_()
    with torch.enable_grad():
        grad = torch.autograd.grad(model(flat).gather(1, rows).sum(), flat)[0].reshape(n, s, d)
    return grad if neighbourhood == "gaussian" else x0.detach()[:, None] * grad


def lfa_loss(z: Tensor, response: Tensor, attributions: Tensor, bias: Tensor | None = None,
             loss: str = "squared") -> Tensor:
    """Per-row LFA loss ``[N]`` (float64), the mean over the ``S`` perturbations of
    squared: ``1/2 (f_s - w^T z_s - b)^2``, ``b`` given or else the best intercept
    ``mean_s (f_s - w^T z_s)``; gradient matching: ``||grad_z f_s - w||^2``."""
    _check(z, response, attributions, bias, loss)
    z, r, w = z.to(_STAT), response.to(_STAT), attributions.to(_STAT)
    if loss == "gradient_matching":
        return (r - w[:, None]).pow(2).sum(2).mean(1)
    resid = r - (z * w[:, None]).sum(2)
    b = resid.mean(1, keepdim=True) if bias is None else bias.to(_STAT)[:, None]
    return 0.5 * (resid - b).pow(2).mean(1)


def _check(z: Tensor, response: Tensor, attributions: Tensor, bias: Tensor | None, loss: str) -> None:
    if loss not in _LOSSES:
        raise ConfigError(f"{_NAME}: loss must be 'squared' or 'gradient_matching', got {loss!r}",
                          param="loss")
    if z.dim() != 3 or not z.is_floating_point():
        raise ShapeError(f"{_NAME}: z must be floating perturbations [N, S, D], got {z.dtype} "
                         f"{list(z.shape)}")
    n, s, d = z.shape
    want = [n, s] if loss == "squared" else [n, s, d]
    if list(response.shape) != want or not response.is_floating_point():
        raise ShapeError(f"{_NAME}: response must be floating {want} for loss={loss!r} (z is "
                         f"{list(z.shape)}), got {response.dtype} {list(response.shape)}")
    if list(attributions.shape) != [n, d] or not attributions.is_floating_point():
        raise ShapeError(f"{_NAME}: attributions must be floating [{n}, {d}], got "
                         f"{attributions.dtype} {list(attributions.shape)}")
    if bias is not None:
        if loss != "squared":
            raise ShapeError(f"{_NAME}: bias is for loss='squared' only (the gradient of g has none)")
        if list(bias.shape) != [n]:
            raise ShapeError(f"{_NAME}: bias must be [{n}], got {list(bias.shape)}")


def _example(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``update`` arguments for the conformance kit: Gaussian perturbations ``[B, 6, 4]`` of a
    quadratic model's input, its values and a noisy gradient explanation."""
    x0 = torch.randn(batch_size, 4, generator=generator)
    z = 0.1 * torch.randn(batch_size, 6, 4, generator=generator)
    x = x0[:, None] + z
    w = 2 * x0 + 0.1 * torch.randn(batch_size, 4, generator=generator)
    return z, x.pow(2).sum(2), w


class LocalFunctionApproximation(Metric):
    """``update(z, response, attributions, bias=None)`` adds each row's LFA loss
    (:func:`lfa_loss`; build ``z`` with :func:`perturb` and ``response`` with :func:`responses`);
    ``compute()`` is their mean over every row updated."""

    example_inputs = staticmethod(_example)

    def __init__(self, loss: Annotated[str, one_of(_LOSSES)] = "squared"):
        self.loss = loss
        self.reset()

    def update(self, z: Tensor, response: Tensor, attributions: Tensor, bias: Tensor | None = None) -> None:
        per_row = lfa_loss(z, response, attributions, bias, self.loss)
        # a NaN in response or attributions reaches the sum; z only through the squared loss
        total = per_row.sum() + nan_if_any_nan(z).to(per_row.device)
        count = torch.tensor(float(per_row.numel()), dtype=_STAT, device=per_row.device)
        self._sum = total if self._sum is None else self._sum + total.to(self._sum.device)
        self._count = count if self._count is None else self._count + count.to(self._count.device)

    def compute(self) -> float:
        if self._sum is None or not float(self._count) > 0:
            return math.nan
        return float(self._sum / self._count)

    def reset(self) -> None:
        self._sum: Tensor | None = None
        self._count: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self._sum is None else {"sum": self._sum.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "sum" in state:
            self._sum = torch.as_tensor(state["sum"]).clone()
            self._count = torch.as_tensor(state["count"]).clone()


CARD = Card(
    name=_NAME, kind="metric",
    title="Which Explanation Should I Choose? A Function Approximation Perspective to "
          "Characterizing Post Hoc Explanations",
    paper="arXiv:2206.01254",
    summary="Local function approximation loss of a feature attribution: how well the linear "
            "model g(z) = w^T z it implies matches the model f over a neighbourhood of "
            "perturbations (Gaussian x0 + z, binary masks x0 * z, or path scalings alpha x0), "
            "under the squared or the gradient-matching loss. Lower is more faithful in that "
            "neighbourhood; the paper's guiding principle picks the explanation with the "
            "smallest loss in the neighbourhood of interest.",
    formula="LFA(w) = 1/N sum_i mean_s l(z_is); squared: l = 1/2 (f(x(z)) - w^T z - b)^2, b given "
            "or the best intercept mean_s (f - w^T z); gradient matching: l = ||grad_z f(x(z)) - "
            "w||^2; perturb(): gaussian sigma = 0.1, binary p = 1/2, uniform alpha ~ U(low = 0, "
            "1); n_samples = 1000",
    left_out="The exponential (LIME) and Shapley (KernelSHAP) kernel weights over perturbations "
             "(the loss here weighs them equally, as the authors' SmoothGrad, C-LIME and "
             "Integrated Gradients instances do) and the one-hot occlusion neighbourhood; the "
             "paper's explanation methods themselves (their explanations are inputs here) and "
             "its fitting of g by gradient descent; the halved squared loss follows the authors' "
             "code (l2_loss), which could not be checked against the paper's text here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LocalFunctionApproximation, card=CARD)
