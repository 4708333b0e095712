"""Stitchable Neural Networks (SN-Net): a small and a large anchor joined by linear stitches.

Pan, Cai and Zhuang, "Stitchable Neural Networks", CVPR 2023, arXiv:2302.06586 (authors' code:
ziplab/SN-Net).

Both anchors are sequences of ``D`` blocks and a head. A stitch ``(j, l)`` runs the small anchor's
blocks ``0..j``, a stitching layer ``S`` (a linear map of the channel dimension), the large
anchor's blocks ``l..D-1`` and its head:

    f_{j,l}(x) = head_L(B^L_{D-1} ... B^L_l(S(B^S_j ... B^S_0(x))))

Stitches come from a sliding window (``kernel_size`` 2, ``stride`` 1) over the block indices:
the pairs ``(j, l)`` of one window share one stitching layer, initialised by least squares from
the anchors' activations on a batch (``init_stitches``): ``[X^S_j, 1] A = X^L_{l-1}`` solved for
every pair of the window and averaged. The configurations are the two anchors and every stitch;
in training each forward draws one uniformly, in evaluation ``select(i)`` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk.backbone import ModuleEncoder
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import mlp_layers


def paired_stitches(depth: int, kernel_size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(j, l, window)`` for every new pair ``j, l`` of each window ``[i, i + kernel_size)``,
    ``i = 0, stride, ...``, with ``l >= 1`` (stitching into the large anchor's input is not a
    stitch); a window adding no new pair adds no stitching layer."""
    seen, out, window = set(), [], 0
    for i in range(0, depth, stride):
        ids = range(i, min(i + kernel_size, depth))
        new = [(j, l) for j in ids for l in ids if l >= 1 and (j, l) not in seen]
        if new:
            seen.update(new)
            out += [(j, l, window) for j, l in new]
            window += 1
    return out


def least_squares_stitch(front: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """``W [C_end, C_front], b [C_end]`` minimising ``||front W^T + b - end||^2`` over the rows
    (channels last; other dimensions are rows), in float64."""
    x = front.reshape(-1, front.shape[-1]).double()
    y = end.reshape(-1, end.shape[-1]).double()
    a = torch.linalg.lstsq(torch.cat([x, torch.ones_like(x[:, :1])], 1), y).solution
    return a[:-1].T, a[-1]


def _blocks(anchor: nn.Module, name: str) -> nn.Sequential:
    seq = anchor if isinstance(anchor, nn.Sequential) else getattr(anchor, "module", None)
    if not isinstance(seq, nn.Sequential) or len(seq) < 2:
        raise ConfigError(f"stitchable_networks: {name} must be an nn.Sequential of blocks and a "
                          f"head (or an encoder wrapping one as .module), got "
                          f"{type(anchor).__name__}", param=name)
    return seq


class StitchableNetworks(Encoder):
    """SN-Net over two anchors (module docstring). ``small``/``large``: encoders (or modules)
    that are, or wrap as ``.module``, an ``nn.Sequential`` of the same number of blocks followed
    by a head, with equal ``out_dim``; activations ``[B, C]`` or ``[B, N, C]`` (channels last).
    ``input_shape`` (one sample's shape, default ``(in_dim,)``) is used once to find the widths.
    Without anchors, two MLPs of ``small_dims`` / ``large_dims`` (one block per entry: Linear,
    BatchNorm, ReLU) and a linear head to ``out_dim`` are built."""

    def __init__(self, small: nn.Module | None = None, large: nn.Module | None = None,
                 in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 small_dims: tuple[int, ...] | list[int] = (32, 32, 32),
                 large_dims: tuple[int, ...] | list[int] = (128, 128, 128),
                 out_dim: Annotated[int, Ge(1)] = 128,
                 kernel_size: Annotated[int, Ge(1)] = 2, stride: Annotated[int, Ge(1)] = 1,
                 input_shape: Sequence[int] | None = None):
        super().__init__()
        if (small is None) != (large is None):
            raise ConfigError("stitchable_networks: give both anchors or neither", param="small")
        if small is None:
            small, large = (self._mlp(in_dim, dims, out_dim) for dims in (small_dims, large_dims))
        self.small, self.large = small, large
        self.front, self.end = _blocks(small, "small"), _blocks(large, "large")
        if len(self.front) != len(self.end):
            raise ConfigError(f"stitchable_networks: the anchors must have as many blocks, got "
                              f"{len(self.front) - 1} and {len(self.end) - 1}", param="large")
        self.in_dim = in_dim
        self.input_shape = tuple(input_shape) if input_shape is not None else (in_dim,)
        self.out_dim = getattr(large, "out_dim", None) or self._widths(self.end)[-1]
        if getattr(small, "out_dim", self.out_dim) != self.out_dim:
            raise ConfigError(f"stitchable_networks: the anchors' out_dim differ "
                              f"({small.out_dim} and {self.out_dim})", param="small")
        depth = len(self.front) - 1
        self.stitches = paired_stitches(depth, kernel_size, stride)
        if not self.stitches:
            raise ConfigError("stitchable_networks: the anchors need at least 2 blocks to stitch",
                              param="small")
        fw, ew = self._widths(self.front), self._widths(self.end)
        layers: dict[int, tuple[int, int]] = {}
        for j, l, w in self.stitches:
            shape = (fw[j], ew[l - 1])
            if layers.setdefault(w, shape) != shape:
                raise ConfigError(f"stitchable_networks: the pairs of stitching window {w} need "
                                  f"equal widths, got {layers[w]} and {shape}", param="kernel_size")
        self.stitch_layers = nn.ModuleList(nn.Linear(*layers[w]) for w in range(len(layers)))
        self.configs: list[tuple[int, ...]] = [(0,), (1,), *((j, l) for j, l, _ in self.stitches)]
        self.config_id = 1
        self._batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    @staticmethod
    def _mlp(in_dim: int, dims: Sequence[int], out_dim: int) -> Encoder:
        widths = [in_dim, *dims]
        blocks = [mlp_layers([a, b, b])[:3] for a, b in zip(widths[:-1], widths[1:])]
        return ModuleEncoder(nn.Sequential(*blocks, nn.Linear(widths[-1], out_dim)),
                             out_dim=out_dim)

    def _widths(self, seq: nn.Sequential) -> list[int]:
        """The channel width after each child (one dry forward without gradients, eval mode)."""
        shape = self.input_shape
        modes = {m: m.training for m in seq.modules()}
        widths = []
        try:
            seq.eval()
            with torch.no_grad():
                h = torch.zeros(2, *shape, dtype=next(seq.parameters()).dtype)
                for child in seq:
                    h = child(h)
                    if h.dim() not in (2, 3):
                        raise ConfigError(f"stitchable_networks: block activations must be [B, C] "
                                          f"or [B, N, C], got {list(h.shape)}", param="small")
                    widths.append(h.shape[-1])
        finally:
            for m, mode in modes.items():
                m.training = mode
        return widths

    def select(self, config: int) -> StitchableNetworks:
        """Use configuration ``config`` (an index of :attr:`configs`: 0 the small anchor, 1 the
        large, then the stitches ``(j, l)``) outside training."""
        if not 0 <= config < len(self.configs):
            raise ConfigError(f"stitchable_networks: config must be in [0, {len(self.configs)}), "
                              f"got {config}", param="config")
        self.config_id = config
        return self

    def run(self, x: Tensor, config: int) -> Tensor:
        """The output of configuration ``config`` on ``x``."""
        if config == 0:
            return self.small(x)
        if config == 1:
            return self.large(x)
        j, l, w = self.stitches[config - 2]
        h = x
        for block in self.front[:j + 1]:
            h = block(h)
        h = self.stitch_layers[w](h)
        for block in self.end[l:]:
            h = block(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape or not x.is_floating_point():
            raise ShapeError(f"encoder 'stitchable_networks': x must be a floating batch "
                             f"[B, {', '.join(map(str, self.input_shape))}], got {x.dtype} "
                             f"{list(x.shape)}")
        if self.training and x.shape[0] == 1 and self._batch_norm:
            raise ShapeError("encoder 'stitchable_networks': x is a batch of one, which batch norm "
                             "in training mode cannot normalise")
        config = (int(torch.randint(len(self.configs), (1,))) if self.training
                  else self.config_id)
        return self.run(x, config)

    def parameter_count(self, config: int) -> int:
        """Parameters configuration ``config`` uses."""
        if config < 2:
            return sum(p.numel() for p in (self.small if config == 0 else self.large).parameters())
        j, l, w = self.stitches[config - 2]
        mods = [*self.front[:j + 1], self.stitch_layers[w], *self.end[l:]]
        return sum(p.numel() for m in mods for p in m.parameters())

    @torch.no_grad()
    def init_stitches(self, x: Tensor) -> None:
        """Least-squares initialisation of every stitching layer from the anchors' activations on
        ``x`` (eval mode; averaged over the pairs sharing a layer)."""
        feats = []
        for seq in (self.front, self.end):
            modes = {m: m.training for m in seq.modules()}
            seq.eval()
            h, out = x, []
            for child in seq:
                h = child(h)
                out.append(h)
            feats.append(out)
            for m, mode in modes.items():
                m.training = mode
        solved: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for j, l, w in self.stitches:
            solved.setdefault(w, []).append(least_squares_stitch(feats[0][j], feats[1][l - 1]))
        for w, pairs in solved.items():
            layer = self.stitch_layers[w]
            layer.weight.copy_(torch.stack([p[0] for p in pairs]).mean(0))
            layer.bias.copy_(torch.stack([p[1] for p in pairs]).mean(0))


CARD = Card(
    name="stitchable_networks", kind="encoder", title="Stitchable Neural Networks",
    paper="arXiv:2302.06586",
    summary="A small and a large pretrained anchor joined by linear stitching layers (one per "
            "sliding window of block pairs, least-squares initialised); one network gives many "
            "accuracy/size trade-offs, trained by drawing a configuration per step.",
    formula="f_{j,l} = head_L o B^L_{D-1..l} o S_w o B^S_{j..0}; S_w = mean over the window's pairs "
            "of argmin ||[X^S_j, 1] A - X^L_{l-1}||; configs: anchors + pairs of windows of 2, "
            "stride 1",
    left_out="Paired stitching only (equal depths): the authors' unpaired stitching of anchors of "
             "different depths, three-anchor chains and CNN (1x1 conv) stitches are not here; "
             "pairs stitching into the large anchor's input (l = 0, whose target the authors' "
             "code takes from the last block) are left out. No ImageNet DeiT/Swin anchors; the "
             "Pareto search over configurations is the user's (parameter_count, select).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(StitchableNetworks, card=CARD)
