"""The nonlinear projection head of SimCLR, stacked on a backbone Encoder.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge

from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import check_features, mlp_layers


class ProjectionHead(Encoder):
    """``z = g(f(x))``: an MLP head ``g`` (``layers`` linear layers) on a backbone ``f``.

    The contrastive loss is applied to ``z``; :meth:`features` returns ``f(x)``, the
    representation used downstream (the paper's finding: it transfers better than ``z``).
    Without a backbone the head maps ``in_dim`` features directly (default 128, the ``mlp``
    encoder's default output size). The head's input must be floating ``[B, in_dim]`` of its
    parameters' dtype (outside autocast); with batch norm in training mode, a batch of one
    raises :class:`sdk.ShapeError`. ``last_norm``: the output layer is followed by batch norm
    without affine parameters (SimSiam's projector, BN on every layer including the output).
    Published heads: SimCLR ``layers=2``; BYOL's projector ``hidden_dim=4096, out_dim=256,
    layers=2``; SimSiam's ``hidden_dim=2048, out_dim=2048, layers=3, last_norm=True``; VICReg's
    expander ``hidden_dim=8192, out_dim=8192, layers=3``; SwAV's ``hidden_dim=2048,
    out_dim=128, layers=2``.
    """

    def __init__(self, backbone: Encoder | None = None,
                 in_dim: Annotated[int | None, FromData("in_dim")] = None,
                 hidden_dim: int = 512, out_dim: int = 128, layers: Annotated[int, Ge(1)] = 2,
                 batch_norm: bool = True, last_norm: bool = False):
        super().__init__()
        if backbone is not None and in_dim is not None and in_dim != backbone.out_dim:
            raise ConfigError(f"projection_head: in_dim={in_dim} disagrees with the backbone's "
                              f"out_dim={backbone.out_dim}", param="in_dim")
        self.backbone = backbone
        self.in_dim = backbone.out_dim if backbone is not None else (in_dim or 128)
        self.out_dim, self.batch_norm = out_dim, batch_norm or last_norm
        self.head = mlp_layers([self.in_dim, *[hidden_dim] * (layers - 1), out_dim],
                               batch_norm=batch_norm, last_norm=last_norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) if self.backbone is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        check_features("encoder 'projection_head'", "x" if self.backbone is None else "the backbone's "
                       "output", h, self.in_dim, module=self.head, batch_norm=self.batch_norm)
        return self.head(h)


CARD = Card(
    name="projection_head", kind="encoder",
    title="A Simple Framework for Contrastive Learning of Visual Representations (SimCLR)",
    paper="arXiv:2002.05709",
    summary="MLP projection head g on a backbone f; train the loss on g(f(x)), use f(x) downstream.",
    formula="z = W_2 ReLU(BN(W_1 f(x)))",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ProjectionHead, card=CARD)
