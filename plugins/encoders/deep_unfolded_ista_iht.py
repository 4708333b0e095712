"""Deep-unfolded ISTA and IHT for sparse recovery with learned per-layer step sizes, trained
supervised (MSE to the true signal) or unsupervised (the original problem's objective).

Nagahisa, Hayakawa and Iiguni, "Comparison between Supervised and Unsupervised Learning in Deep
Unfolded Sparse Signal Recovery", 2025 (arXiv:2509.01331); ISTA as unfolded layers after Gregor
and LeCun's LISTA (ICML 2010).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder, Objective
from sdk.types import Batch, Loss, Views

ALGORITHMS = ("ista", "iht")
LOSSES = ("supervised", "unsupervised")


def gaussian_sensing(m: int = 150, n: int = 300, seed: int = 0) -> Tensor:
    """``A [m, n]`` with i.i.d. ``N(0, 1/m)`` entries (the paper's sensing matrix)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64).div(math.sqrt(m)).float()


def _sensing(owner: str, sensing: Any, m: int, n: int, seed: int) -> Tensor:
    if sensing is None:
        return gaussian_sensing(m, n, seed)
    a = torch.as_tensor(sensing)
    if a.dim() != 2 or not a.is_floating_point() or not torch.isfinite(a).all():
        raise ConfigError(f"{owner}: sensing must be a finite floating matrix [m, n], got "
                          f"{a.dtype} {list(a.shape)}", param="sensing")
    return a.detach().clone()


def threshold(v: Tensor, gamma: Tensor, lam: float, algorithm: str) -> Tensor:
    """The proximal step ``η``: soft threshold at ``γλ`` (ISTA, the ℓ1 prox) or hard threshold
    at ``sqrt(2γλ)`` (IHT, the ℓ0 prox)."""
    if algorithm == "ista":
        return v.sign() * (v.abs() - gamma * lam).clamp_min(0)
    return v * (v.abs() > (2 * gamma * lam).sqrt())


def unfolded(y: Tensor, a: Tensor, steps: Tensor, lam: float, algorithm: str = "ista") -> Tensor:
    """``x_T [B, n]`` from ``x_0 = 0`` and ``x_{t+1} = η_t(x_t + γ_t Aᵀ(y - A x_t))`` for each
    ``γ_t`` of ``steps [T]``; ``y [B, m]``, ``A [m, n]``."""
    x = y.new_zeros(y.shape[0], a.shape[1])
    for gamma in steps.unbind():
        x = threshold(x + gamma * ((y - x @ a.T) @ a), gamma, lam, algorithm)
    return x


def sparse_objective(x: Tensor, y: Tensor, a: Tensor, lam: float, algorithm: str = "ista") -> Tensor:
    """``[B]``: ``½‖y - Ax‖² + λ‖x‖₁`` (ISTA) or ``+ λ‖x‖₀`` (IHT; the count has no gradient)."""
    fit = 0.5 * (y - x @ a.T).pow(2).sum(1)
    penalty = x.abs().sum(1) if algorithm == "ista" else (x != 0).sum(1).to(x.dtype)
    return fit + lam * penalty


class DeepUnfoldedISTAIHT(Encoder):
    """``layers`` unfolded ISTA or IHT iterations from the measurements ``y [B, m]`` to the
    recovered signal ``x_T [B, n]``; the trainable parameters are the step sizes ``γ_t``
    (initialised at ``1/L``, ``L = ‖A‖₂²``, which makes the network plain ISTA/IHT). ``sensing``:
    ``A [m, n]`` (a buffer); default :func:`gaussian_sensing` ``(m, n, seed)``."""

    def __init__(self, sensing: Any = None, m: Annotated[int, Ge(1)] = 150,
                 n: Annotated[int, Ge(1)] = 300, seed: int = 0, layers: Annotated[int, Ge(1)] = 10,
                 lam: Annotated[float, Gt(0)] = 0.05,
                 algorithm: Annotated[str, one_of(ALGORITHMS)] = "ista",
                 step_init: Annotated[float | None, Gt(0)] = None):
        super().__init__()
        a = _sensing("deep_unfolded_ista_iht", sensing, m, n, seed)
        self.register_buffer("sensing", a)
        self.lipschitz = float(torch.linalg.matrix_norm(a.double(), ord=2) ** 2)
        init = step_init if step_init is not None else 1 / self.lipschitz
        self.step = nn.Parameter(torch.full((layers,), init))
        self.lam, self.algorithm = lam, algorithm
        self.in_dim, self.out_dim = a.shape

    def forward(self, y: Tensor) -> Tensor:
        if y.dim() != 2 or y.shape[1] != self.in_dim or not y.is_floating_point():
            raise ShapeError(f"encoder 'deep_unfolded_ista_iht': x must be the floating measurements y "
                             f"[B, {self.in_dim}] (m), got {y.dtype} {list(y.shape)}")
        dtype = torch.promote_types(y.dtype, torch.float32)
        with torch.autocast(y.device.type, enabled=False):
            return unfolded(y.to(dtype), self.sensing.to(dtype), self.step.to(dtype), self.lam,
                            self.algorithm)


class DeepUnfoldedLoss(Objective):
    """The training loss of the unfolded network's output ``x_T = Views.embeddings[0] [B, n]``:
    ``supervised``, ``‖x_T - x*‖²`` against the true signal ``Batch.targets [B, n]``;
    ``unsupervised``, the original problem's objective :func:`sparse_objective` of ``x_T`` and
    the measurements ``Batch.extras[keys.INPUT] [B, m]`` (for IHT the ℓ0 count adds no
    gradient). Averaged over the batch. ``sensing``/``m``/``n``/``seed``, ``lam`` and
    ``algorithm`` must be the encoder's."""

    requires = {"views": 1}
    batch_coupled = False

    def __init__(self, loss: Annotated[str, one_of(LOSSES)] = "unsupervised", sensing: Any = None,
                 m: Annotated[int, Ge(1)] = 150, n: Annotated[int, Ge(1)] = 300, seed: int = 0,
                 lam: Annotated[float, Gt(0)] = 0.05,
                 algorithm: Annotated[str, one_of(ALGORITHMS)] = "ista"):
        super().__init__()
        self.register_buffer("sensing", _sensing("deep_unfolded_ista_iht", sensing, m, n, seed))
        self.loss, self.lam, self.algorithm = loss, lam, algorithm

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'deep_unfolded_ista_iht'"
        x = views.embeddings[0]
        m, n = self.sensing.shape
        if x.dim() != 2 or x.shape[1] != n or not x.is_floating_point():
            raise ShapeError(f"{owner}: Views.embeddings[0] must be the recovered signal "
                             f"[B, {n}] (n), got {x.dtype} {list(x.shape)}")
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self.loss == "supervised":
            target = batch.targets
            if target is None:
                raise RequirementError(f"{owner} (loss='supervised') needs the true signal in "
                                       "Batch.targets")
            if target.shape != x.shape or not target.is_floating_point():
                raise ShapeError(f"{owner}: Batch.targets must be the true signal [{x.shape[0]}, "
                                 f"{n}], got {target.dtype} {list(target.shape)}")
            per_sample = (x.to(dtype) - target.to(dtype)).pow(2).sum(1)
        else:
            y = batch.extras.get(keys.INPUT)
            if y is None:
                raise RequirementError(f"{owner} (loss='unsupervised') needs the measurements in "
                                       f"Batch.extras[{keys.INPUT!r}]")
            if (not isinstance(y, Tensor) or y.shape != (x.shape[0], m)
                    or not y.is_floating_point()):
                raise ShapeError(f"{owner}: Batch.extras[{keys.INPUT!r}] must be the measurements "
                                 f"[{x.shape[0]}, {m}] (m), got {list(getattr(y, 'shape', []))}")
            per_sample = sparse_objective(x.to(dtype), y.to(dtype), self.sensing.to(dtype),
                                          self.lam, self.algorithm)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        m, n = self.sensing.shape
        x_true = torch.randn(batch_size, n, generator=generator) * (
            torch.rand(batch_size, n, generator=generator) < 0.1)
        y = x_true @ self.sensing.T + 0.01 * torch.randn(batch_size, m, generator=generator)
        x = (x_true + 0.1 * torch.randn(batch_size, n, generator=generator)).requires_grad_()
        return Views(embeddings=(x,)), Batch(targets=x_true, index=torch.arange(batch_size),
                                             extras={keys.INPUT: y})


_TITLE = ("Comparison between Supervised and Unsupervised Learning in Deep Unfolded Sparse "
          "Signal Recovery (deep-unfolded ISTA / IHT)")
_LEFT_OUT = ("Only the step sizes are learned, as in the paper (LISTA's learned matrices are not "
             "here); incremental layer-wise training is left to the training loop; the paper's "
             "Adam lr 1e-3 is the optimizer's setting, not this module's.")

CARD = Card(
    name="deep_unfolded_ista_iht", kind="encoder", title=_TITLE, paper="arXiv:2509.01331",
    summary="T unfolded ISTA (soft threshold) or IHT (hard threshold) iterations from measurements "
            "y = A x* + noise to a sparse estimate, with a learnable step size per layer "
            "initialised at 1/L (plain ISTA/IHT).",
    formula="x_0 = 0; x_{t+1} = η(x_t + γ_t Aᵀ(y - A x_t)); η = soft threshold at γ_t λ (ISTA) "
            "or hard threshold at sqrt(2 γ_t λ) (IHT); γ_t init 1/‖A‖₂²; A ~ N(0, 1/m), "
            "m = 150, n = 300, T = 10, λ = 0.05",
    left_out=_LEFT_OUT,
)

OBJECTIVE_CARD = Card(
    name="deep_unfolded_ista_iht", kind="objective", title=_TITLE, paper="arXiv:2509.01331",
    summary="Train the unfolded network supervised (squared error to the true sparse signal) or "
            "unsupervised (the original ℓ1 / ℓ0-regularised least-squares objective of its output).",
    formula="supervised: ‖x_T - x*‖²; unsupervised: ½‖y - A x_T‖² + λ‖x_T‖₁ (ISTA) or "
            "+ λ‖x_T‖₀ (IHT); averaged over the batch",
    left_out=_LEFT_OUT,
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DeepUnfoldedISTAIHT, card=CARD)
    registry.add(DeepUnfoldedLoss, card=OBJECTIVE_CARD)
