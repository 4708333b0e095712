"""DINO's projection head: an MLP, an L2-normalised bottleneck and a weight-normalised layer
to ``out_dim`` prototypes, stacked on a backbone Encoder.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import ACTIVATIONS, L2Normalize, WeightNormLinear, check_features, mlp_layers


class DINOHead(Encoder):
    """``z = W_last normalize(mlp(f(x)))``: ``layers`` linear layers ``in_dim -> hidden_dim ->
    ... -> bottleneck_dim`` (GELU between, batch norm optional), the L2-normalised bottleneck,
    and a weight-normalised linear layer without bias to ``out_dim`` (:class:`sdk.layers.
    WeightNormLinear`; ``norm_last_layer``: its row norms are fixed at 1).

    The head is part of the encoder so that the EMA teacher (``ema``) copies it with the
    backbone, as DINO's teacher is a momentum copy of backbone and head. :meth:`features` is
    ``f(x)``, the representation used downstream. MLP weights start from a normal of std 0.02
    with zero biases, as in the authors' code. The head's input must be floating
    ``[B, in_dim]`` of its parameters' dtype (outside autocast)."""

    def __init__(self, backbone: Encoder | None = None,
                 in_dim: Annotated[int | None, FromData("in_dim")] = None,
                 hidden_dim: Annotated[int, Ge(1)] = 2048,
                 bottleneck_dim: Annotated[int, Ge(1)] = 256,
                 out_dim: Annotated[int, Ge(1)] = 4096, layers: Annotated[int, Ge(1)] = 3,
                 activation: Annotated[str, one_of(ACTIVATIONS)] = "gelu",
                 batch_norm: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if backbone is not None and in_dim is not None and in_dim != backbone.out_dim:
            raise ConfigError(f"dino_head: in_dim={in_dim} disagrees with the backbone's "
                              f"out_dim={backbone.out_dim}", param="in_dim")
        self.backbone = backbone
        self.in_dim = backbone.out_dim if backbone is not None else (in_dim or 128)
        self.out_dim, self.batch_norm = out_dim, batch_norm
        mlp = mlp_layers([self.in_dim, *[hidden_dim] * (layers - 1), bottleneck_dim],
                         activation=activation, batch_norm=batch_norm)
        for m in mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # the authors' truncation at +-2 is 100 std away
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.head = nn.Sequential(mlp, L2Normalize(),
                                  WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) if self.backbone is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        check_features("encoder 'dino_head'", "x" if self.backbone is None else "the backbone's "
                       "output", h, self.in_dim, module=self.head, batch_norm=self.batch_norm)
        return self.head(h)


CARD = Card(
    name="dino_head", kind="encoder",
    title="Emerging Properties in Self-Supervised Vision Transformers (DINO), projection head",
    paper="arXiv:2104.14294",
    summary="DINO's head on a backbone: a 3-layer GELU MLP to a 256-d bottleneck, L2 "
            "normalisation, and a weight-normalised linear layer to out_dim prototypes.",
    formula="z = W_last(u / ||u||), u = mlp(f(x)); W_last,k = g_k v_k / ||v_k|| "
            "(g_k = 1 when norm_last_layer)",
    left_out="DINO's freezing of the last layer during the first epoch (the authors cancel its "
             "gradients; a callback zeroing them in before_optimizer_step does it). Deviation: "
             "out_dim defaults to 4096, not the paper's 65536 (set it for the published head; "
             "small data wants a much smaller one); hidden 2048 and bottleneck 256 are the "
             "paper's.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DINOHead, card=CARD)
