"""A two-tower (dual) encoder, or one of more towers: each view is encoded by the tower its input
is marked for (:mod:`sdk.multimodal`), so the views of one sample come from different encoders
over different modalities, as in CLIP's image and text encoders.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP),
ICML 2021, arXiv:2103.00020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from annotated_types import Ge, MinLen
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import check_features, mlp_layers
from sdk.multimodal import split_tower


class _MLPTower(Encoder):
    """``in_dim -> hidden_dim -> out_dim`` (Linear, BatchNorm, ReLU, Linear)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.layers = mlp_layers([in_dim, hidden_dim, out_dim])

    def forward(self, x: Tensor) -> Tensor:
        check_features("encoder 'multi_tower'", "x (a tower's input)", x, self.in_dim,
                       module=self.layers, batch_norm=True)
        return self.layers(x)


class MultiTower(Encoder):
    """``forward(x) = towers[t](x)`` with ``t`` the tower ``x`` is marked for
    (:func:`sdk.multimodal.for_tower`; unmarked: tower 0), and ``features`` likewise. Every
    tower must have one ``out_dim`` (the views share one embedding space). ``towers``: two or
    more sdk encoders (``sdk.encoder(module)`` wraps any ``nn.Module``; towers may share
    modules, e.g. the stages of a multi-level image encoder); without them, one MLP tower
    (Linear, BatchNorm, ReLU, Linear to ``out_dim``, default 32, hidden width ``hidden_dim``,
    default 64) per entry of ``in_dims`` (default ``(64, 16)``: a digits image and its 16 row
    and column mean intensities)."""

    def __init__(self, towers: Sequence[Encoder] | None = None,
                 in_dims: Annotated[tuple[Annotated[int, Ge(1)], ...], MinLen(2)] | None = None,
                 hidden_dim: Annotated[int, Ge(1)] | None = None,
                 out_dim: Annotated[int, Ge(1)] | None = None):
        super().__init__()
        if towers is not None:
            if len(towers) < 2:
                raise ConfigError(f"multi_tower: towers must hold at least 2 encoders, got "
                                  f"{len(towers)}", param="towers")
            given = [k for k, v in (("in_dims", in_dims), ("hidden_dim", hidden_dim),
                                    ("out_dim", out_dim)) if v is not None]
            if given:
                raise ConfigError(f"multi_tower: {', '.join(given)} build the default MLP towers; "
                                  "give them or towers, not both", param=given[0])
        else:
            towers = [_MLPTower(d, hidden_dim or 64, out_dim or 32) for d in in_dims or (64, 16)]
        dims = [getattr(t, "out_dim", None) for t in towers]
        if None in dims or len(set(dims)) > 1:
            raise ConfigError(f"multi_tower: every tower must declare one out_dim (one embedding "
                              f"space for all views), got {dims}", param="towers")
        self.towers = nn.ModuleList(towers)
        self.out_dim = dims[0]
        self.in_dim = getattr(towers[0], "in_dim", None)  # what an unmarked input must be

    def _tower(self, x: Tensor) -> tuple[nn.Module, Tensor]:
        plain, t = split_tower(x)
        t = 0 if t is None else t
        if t >= len(self.towers):
            raise ShapeError(f"encoder 'multi_tower': the input is marked for tower {t}, but there "
                             f"are {len(self.towers)} towers")
        return self.towers[t], plain

    def forward(self, x: Tensor) -> Tensor:
        tower, plain = self._tower(x)
        return tower(plain)

    def features(self, x: Tensor) -> Tensor:
        tower, plain = self._tower(x)
        return tower.features(plain) if isinstance(tower, Encoder) else tower(plain)


CARD = Card(
    name="multi_tower", kind="encoder",
    title="Learning Transferable Visual Models From Natural Language Supervision (CLIP)",
    paper="arXiv:2103.00020",
    summary="Two-tower (dual) encoder, or more towers: each view is encoded by the tower its "
            "input is marked for (sdk.multimodal.TowerView), e.g. an image tower and a text "
            "tower over the two modalities of one sample.",
    formula="z_v = f_{t(v)}(x_v), t(v) the tower view v's input is marked for (0 when unmarked)",
    left_out="No text transformer or image ViT/ResNet of CLIP: towers are any encoders given "
             "(by default small MLPs).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MultiTower, card=CARD)
