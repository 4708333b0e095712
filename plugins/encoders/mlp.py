"""A multi-layer perceptron encoder (flattens its input)."""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import ACTIVATIONS, check_features, mlp_layers


class MLP(Encoder):
    """``x -> flatten -> [Linear -> BN -> act] * len(hidden_dims) -> Linear``.

    ``x`` must be floating, of ``in_dim`` features once flattened and of the parameters' dtype
    (outside autocast); with batch norm in training mode, a batch of one raises
    :class:`sdk.ShapeError` (it has no batch statistics)."""

    def __init__(self, in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 hidden_dims: tuple[int, ...] | list[int] = (256,),
                 out_dim: Annotated[int, Ge(1)] = 128,
                 activation: Annotated[str, one_of(ACTIVATIONS)] = "relu", batch_norm: bool = True,
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.batch_norm = in_dim, out_dim, batch_norm
        self.net = mlp_layers([in_dim, *hidden_dims, out_dim], activation=activation,
                              batch_norm=batch_norm, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ShapeError(f"encoder 'mlp': x must be a batch [B, ...] of {self.in_dim} features, "
                             f"got {list(x.shape)}")
        x = x.flatten(1)
        check_features("encoder 'mlp'", "x (flattened)", x, self.in_dim, module=self.net,
                       batch_norm=self.batch_norm)
        return self.net(x)


CARD = Card(
    name="mlp", kind="encoder", title="Multi-layer perceptron",
    paper="https://doi.org/10.1038/323533a0",
    summary="Fully connected encoder with batch norm; the backbone of the tabular/digits recipes.",
    formula="h_{k+1} = act(BN(W_k h_k)); z = W_L h_L",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MLP, card=CARD)
