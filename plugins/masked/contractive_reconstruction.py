"""The reconstruction contractive auto-encoder: squared reconstruction error plus sigma^2 times the
squared Frobenius norm of the whole reconstruction's Jacobian; ``(r(x) - x) / sigma^2`` then
estimates the score ``d log p(x) / dx``.

Alain and Bengio, "What Regularized Auto-Encoders Learn from the Data-Generating Distribution",
JMLR 15, 2014 (arXiv:1211.4246).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.layers import ACTIVATIONS, mlp_layers
from sdk.types import Batch, Loss, Views

EXACT_MAX_DIM = 64
"""With ``probes=None`` the Jacobian norm is exact for inputs of at most this many values."""


def _loss_dtype(t: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (the loss is never computed in half precision)."""
    return torch.promote_types(t.dtype, torch.float32)


def jacobian_frobenius(r: Tensor, x: Tensor, probes: int | None = None) -> Tensor:
    """``[B]``: ``||d r_i / d x_i||_F^2`` of each row, by reverse mode through the autograd graph
    (``create_graph``, so the penalty trains). ``probes=None``: exact, ``sum_k ||J^T e_k||^2``
    over the basis of the output (one backward pass per output value); ``probes=n``:
    Hutchinson's estimate ``mean_n ||J^T eps_n||^2``, ``eps_n ~ N(0, I)`` (unbiased, since
    ``E[eps^T J J^T eps] = tr(J J^T)``). Rows must not depend on each other (no batch norm in
    training mode); zero where ``r`` does not depend on ``x`` through the graph (inside
    ``torch.no_grad``, or ``x`` not the tensor ``r`` was computed from)."""
    dtype = _loss_dtype(r)
    if not (r.requires_grad and x.requires_grad and torch.is_grad_enabled()):
        return r.new_zeros(r.shape[0], dtype=dtype)
    flat = r.flatten(1)
    if probes is None:
        eye = torch.eye(flat.shape[1], dtype=r.dtype, device=r.device)
        vectors = [eye[k].expand_as(flat) for k in range(flat.shape[1])]
    else:
        vectors = [torch.randn_like(flat) for _ in range(probes)]
    total = r.new_zeros(r.shape[0], dtype=dtype)
    for v in vectors:
        g, = torch.autograd.grad(flat, x, grad_outputs=v, create_graph=True, allow_unused=True)
        if g is None:
            return total
        total = total + g.to(dtype).flatten(1).pow(2).sum(1)
    return total if probes is None else total / probes


def contractive_loss(r: Tensor, x: Tensor, sigma: float, probes: int | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(per_sample, reconstruction, jacobian)``, each ``[B]``: ``||r(x_i) - x_i||^2 + sigma^2
    ||d r / d x (x_i)||_F^2`` (the paper's reconstruction contractive criterion), in float32
    (float64 for float64 inputs)."""
    dtype = _loss_dtype(r)
    rec = (r.to(dtype).flatten(1) - x.to(dtype).flatten(1)).pow(2).sum(1)
    jac = jacobian_frobenius(r, x, probes)
    return rec + sigma ** 2 * jac, rec, jac


def denoising_loss(r_noisy: Tensor, x: Tensor) -> Tensor:
    """``[B]``: the denoising auto-encoder's ``||r(x_i + eps_i) - x_i||^2``, ``eps ~ N(0,
    sigma^2 I)`` drawn by the transform that fed ``r`` (equivalent to the RCAE criterion as
    ``sigma -> 0``, the paper's link between the contractive and the denoising criteria)."""
    dtype = _loss_dtype(r_noisy)
    return (r_noisy.to(dtype).flatten(1) - x.to(dtype).flatten(1)).pow(2).sum(1)


def score_estimate(r: Tensor, x: Tensor, sigma: float) -> Tensor:
    """``(r(x) - x) / sigma^2``: the trained auto-encoder's estimate of ``d log p(x) / dx``
    (Theorem 1: ``r*(x) = x + sigma^2 d log p / dx + o(sigma^2)``)."""
    return (r - x.reshape(r.shape)) / sigma ** 2


class ContractiveReconstruction(Objective):
    """``r(x) = dec(enc(x))``: the encoder's output ``Views.embeddings[0]`` ``[B, embed_dim]``
    through this objective's decoder (an MLP ``embed_dim -> decoder_hidden... -> in_dim``), and
    the clean input ``Batch.extras[keys.INPUT]`` (``[B, in_dim]`` or any ``[B, ...]`` of
    ``in_dim`` values), which the bound transform :attr:`inputs` passes on.

    Contractive (``denoising=False``): loss ``||r(x) - x||^2 + sigma^2 ||dr/dx||_F^2`` per
    sample, averaged; the Jacobian is of the *whole* reconstruction with respect to the tensor
    the encoder saw (exact when ``probes`` is None and the input has at most 64 values, else
    Hutchinson with ``probes`` Gaussian vectors, one if None). Under ``torch.no_grad``
    (validation) the Jacobian cannot be taken and the loss is the reconstruction term alone.
    Denoising (``denoising=True``): :attr:`inputs` feeds ``x + eps``, ``eps ~ N(0, sigma^2 I)``,
    and the loss is ``||r(x + eps) - x||^2``. :meth:`score` gives ``(r(x) - x) / sigma^2``."""

    requires = {"views": 1, "extras": (keys.INPUT,)}
    batch_coupled = False

    def __init__(self, in_dim: Annotated[int | None, Ge(1), FromData("in_dim")] = None,
                 embed_dim: Annotated[int, Ge(1)] = 64, sigma: Annotated[float, Gt(0)] = 0.1,
                 probes: Annotated[int | None, Ge(1)] = None, denoising: bool = False,
                 decoder_hidden: tuple[Annotated[int, Ge(1)], ...] | list[int] = (),
                 activation: Annotated[str, one_of(ACTIVATIONS)] = "tanh"):
        super().__init__()
        if denoising and probes is not None:
            raise ConfigError("contractive_reconstruction: probes set the Jacobian estimate, which "
                              "the denoising criterion does not take", param="probes")
        self.in_dim = in_dim or 64
        self.embed_dim, self.sigma, self.denoising = embed_dim, sigma, denoising
        self.probes = probes if probes is not None or self.in_dim <= EXACT_MAX_DIM else 1
        self.decoder = mlp_layers([embed_dim, *decoder_hidden, self.in_dim], activation=activation,
                                  batch_norm=False)
        object.__setattr__(self, "_inputs", None)

    @property
    def inputs(self) -> ContractiveInputs:
        """The view transform that passes the clean input on (and adds the noise when denoising)."""
        if self._inputs is None:
            object.__setattr__(self, "_inputs", ContractiveInputs(_objective=self))
        return self._inputs

    def reconstruct(self, z: Tensor) -> Tensor:
        """``dec(z)``: ``[B, embed_dim] -> [B, in_dim]``."""
        return self.decoder(z.to(self.decoder[0].weight.dtype)
                            if not torch.is_autocast_enabled(z.device.type) else z)

    def score(self, r: Tensor, x: Tensor) -> Tensor:
        """The score estimate ``(r(x) - x) / sigma^2`` ``[B, in_dim]``."""
        return score_estimate(r, x.flatten(1), self.sigma)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'contractive_reconstruction'"
        z, x = views.embeddings[0], batch.extras[keys.INPUT]
        if z.dim() != 2 or z.shape[1] != self.embed_dim:
            raise ShapeError(f"{owner}: Views.embeddings[0] must be the encoder's output "
                             f"[B, {self.embed_dim}] (embed_dim), got {list(z.shape)}")
        if (not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2
                or x.shape[0] != z.shape[0] or x[0].numel() != self.in_dim):
            shape = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{owner}: Batch.extras[{keys.INPUT!r}] must be the floating input of "
                             f"{z.shape[0]} rows of {self.in_dim} values (in_dim), got {shape}")
        r = self.reconstruct(z)
        if self.denoising:
            per_sample = denoising_loss(r, x)
            return Loss(value=per_sample.mean(), per_sample=per_sample)
        per_sample, rec, jac = contractive_loss(r, x, self.sigma, self.probes)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"reconstruction": rec.mean().detach(), "jacobian": jac.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        x = torch.randn(batch_size, self.in_dim, generator=generator).requires_grad_()
        w = torch.randn(self.in_dim, self.embed_dim, generator=generator) / self.in_dim ** 0.5
        z = torch.tanh(x @ w)
        return Views(embeddings=(z,)), Batch(index=torch.arange(batch_size), extras={keys.INPUT: x})


class ContractiveInputs(Transform):
    """``(x, batch) -> (x', batch + {keys.INPUT: ...})`` for :class:`ContractiveReconstruction`.
    Contractive: ``x'`` is a detached copy of ``x`` that requires grad (so the objective can
    differentiate the reconstruction with respect to it) and is the entry itself. Denoising:
    ``x' = x + sigma * eps``, ``eps ~ N(0, I)``, and the entry is the clean ``x``. Get it as
    ``objective.inputs``."""

    def __init__(self, _objective: ContractiveReconstruction | None = None):
        super().__init__()
        if _objective is None:
            raise ConfigError("contractive_inputs: take it from its objective, "
                              "sdk.create('objective', 'contractive_reconstruction').inputs",
                              param="_objective")
        object.__setattr__(self, "objective", _objective)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        if not x.is_floating_point():
            raise ShapeError(f"transform 'contractive_inputs': x must be floating, got {x.dtype}")
        obj, clean = self.objective, x.detach()
        if obj.denoising:
            fed = clean + obj.sigma * torch.randn_like(clean)
        else:
            clean = fed = clean.clone().requires_grad_(torch.is_grad_enabled())
        return fed, batch.evolve(extras={**batch.extras, keys.INPUT: clean})


CARD = Card(
    name="contractive_reconstruction", kind="objective",
    title="What Regularized Auto-Encoders Learn from the Data-Generating Distribution (RCAE)",
    paper="arXiv:1211.4246",
    summary="Auto-encoder trained on reconstruction error plus sigma^2 times the squared Frobenius "
            "norm of the whole reconstruction's Jacobian (or the small-noise denoising criterion); "
            "(r(x) - x) / sigma^2 then estimates the score d log p / dx.",
    formula="r(x) = dec(enc(x)); L = mean_i ||r(x_i) - x_i||^2 + sigma^2 ||dr/dx (x_i)||_F^2 "
            "(exact for <= 64 inputs, else E_eps ||J^T eps||^2, eps ~ N(0, I)); denoising: "
            "L = mean_i ||r(x_i + eps_i) - x_i||^2, eps ~ N(0, sigma^2 I); "
            "score(x) = (r(x) - x) / sigma^2",
    left_out="The paper is a theory paper: it fixes no sigma (0.1 here, sigma^2 = 0.01) nor an "
             "architecture (an MLP decoder after any encoder here); the approximate "
             "Metropolis-Hastings sampler built on the score is not implemented. Under "
             "torch.no_grad (validation) only the reconstruction term is computed. The Jacobian is "
             "per row, so the encoder must not couple rows (batch norm in training mode). A recipe "
             "cannot bind the transform, which comes from the objective's `inputs` in Python.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ContractiveReconstruction, card=CARD)
