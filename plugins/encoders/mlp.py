"""A multi-layer perceptron encoder (flattens its input)."""

from __future__ import annotations

from typing import Annotated

import torch

from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import mlp_layers


class MLP(Encoder):
    """``x -> flatten -> [Linear -> BN -> act] * len(hidden_dims) -> Linear``."""

    def __init__(self, in_dim: Annotated[int, FromData("in_dim")] = 64,
                 hidden_dims: tuple[int, ...] | list[int] = (256,), out_dim: int = 128,
                 activation: str = "relu", batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if value < 1:
                raise ConfigError(f"mlp: {name} must be >= 1, got {value}", param=name)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"mlp: dropout must be in [0, 1), got {dropout}", param="dropout")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = mlp_layers([in_dim, *hidden_dims, out_dim], activation=activation,
                              batch_norm=batch_norm, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_dim:
            raise ShapeError(f"mlp: expected inputs with {self.in_dim} features, got "
                             f"{list(x.shape)} after flattening")
        return self.net(x)


CARD = Card(
    name="mlp", kind="encoder", title="Multi-layer perceptron",
    paper="https://doi.org/10.1038/323533a0",
    summary="Fully connected encoder with batch norm; the backbone of the tabular/digits recipes.",
    formula="h_{k+1} = act(BN(W_k h_k)); z = W_L h_L",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add("encoder", "mlp", MLP, card=CARD)
