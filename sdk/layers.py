"""Building blocks of encoders and heads: MLP layer stacks with the published normalisation."""

from __future__ import annotations

from torch import nn

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
