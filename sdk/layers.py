"""Building blocks of encoders and heads: MLP layer stacks with the published normalisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sdk.errors import ShapeError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp_layers(dims: list[int], *, activation: str = "relu", batch_norm: bool = True,
               dropout: float = 0.0, last_norm: bool = False) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]``, each hidden one followed by
    (BatchNorm1d,) activation (and dropout); the last layer is linear (optionally normalised)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and not last)))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
        elif last_norm:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def check_features(owner: str, field: str, x: Tensor, width: int, *, module: nn.Module,
                   batch_norm: bool) -> None:
    """Raise :class:`sdk.ShapeError` naming ``owner`` and ``field`` unless ``x`` is a floating
    ``[B, width]`` batch that ``module`` (layers from :func:`mlp_layers`) can take: of its
    parameters' dtype outside autocast, and of more than one row when batch norm trains (one
    row has no batch statistics). Metadata only: no values are read."""
    if x.dim() != 2 or x.shape[1] != width or not x.is_floating_point():
        raise ShapeError(f"{owner}: {field} must be floating [B, {width}], got {x.dtype} "
                         f"{list(x.shape)}")
    dtype = next(module.parameters()).dtype
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ShapeError(f"{owner}: {field} is {x.dtype} but the parameters are {dtype} (cast one "
                         "to the other, or run under torch.autocast)")
    if batch_norm and module.training and x.shape[0] < 2:
        raise ShapeError(f"{owner}: {field} has {x.shape[0]} row, but batch norm in training "
                         "mode needs a batch of at least 2")


class L2Normalize(nn.Module):
    """``x / ||x||_2`` along the last dimension (``F.normalize``, eps 1e-12)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x, dim=-1)


class WeightNormLinear(nn.Module):
    """A linear layer without bias whose rows are weight-normalised (Salimans & Kingma, 2016):
    ``W_k = g_k v_k / ||v_k||``. ``fixed_norm`` (DINO's ``norm_last_layer``): ``g = 1``, not
    learned, so every output is the cosine of a unit input with a direction ``v_k``; else ``g``
    is learned, starting at 1 (as DINO initialises it). ``v`` starts as ``nn.Linear``'s weight."""

    def __init__(self, in_dim: int, out_dim: int, *, fixed_norm: bool = True):
        super().__init__()
        self.v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))  # nn.Linear's initialisation
        self.g = None if fixed_norm else nn.Parameter(torch.ones(out_dim, 1))

    def weight(self) -> Tensor:
        w = self.v / self.v.norm(dim=1, keepdim=True)
        return w if self.g is None else self.g * w

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight())
