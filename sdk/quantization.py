"""Uniform weight quantisation for the quantised-training and rounding plugins: per-channel (or
per-group) grids, symmetric or asymmetric, rounding to nearest or stochastically, the grid
points either side of a weight, and the straight-through estimator.

A :class:`Grid` is fitted to a tensor ``w`` (``[C, ...]``, channels on dim 0, as a Linear or
Conv weight's output channels): the values it can represent are ``(q - zero) * scale`` for
integer codes ``q`` in ``[qmin, qmax]``:

* symmetric: ``qmin = -(2^(b-1) - 1)``, ``qmax = 2^(b-1) - 1``, ``zero = 0``,
  ``scale = max |w| / qmax`` over the channel (or group);
* asymmetric: ``qmin = 0``, ``qmax = 2^b - 1``, ``scale = (max w - min w) / qmax``,
  ``zero = round(-min w / scale)`` clamped to ``[qmin, qmax]``.

With ``group_size`` the channel's trailing entries (``w.flatten(1)``) are split into groups of
that many, each with its own scale. The grid is fitted once and kept: rounding to a fixed grid
is idempotent (``grid.round(grid.round(w)) == grid.round(w)`` bit for bit), which a grid refitted
to rounded weights need not be.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from sdk.errors import ConfigError, ShapeError


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes ``(qmin, qmax)`` of a ``bits``-bit grid (symmetric grids drop the
    most negative code, so they are symmetric about 0)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"quantization: bits must be an integer in [2, 16], got {bits!r}", param="bits")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``floor(x + u)``, ``u ~ U[0, 1)``: rounds up with probability ``x - floor(x)``, so it is
    unbiased (``E = x``)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + u)


@attrs.define(eq=False)
class Grid:
    """A fitted uniform grid (see the module docstring); ``scale`` and ``zero`` broadcast
    against the grouped view of the tensor it was fitted to."""

    scale: Tensor
    zero: Tensor
    bits: int
    symmetric: bool
    shape: tuple[int, ...]
    group_size: int | None

    @classmethod
    def fit(cls, w: Tensor, bits: int, *, symmetric: bool = True,
            group_size: int | None = None) -> Grid:
        qmin, qmax = code_range(bits, symmetric)
        if w.dim() == 0 or w.numel() == 0 or not w.is_floating_point():
            raise ShapeError(f"quantization: a grid is fitted to a floating tensor [C, ...], got "
                             f"{w.dtype} {list(w.shape)}")
        g = _grouped(w.detach(), group_size)
        tiny = torch.finfo(torch.float32).tiny
        if symmetric:
            scale = (g.abs().amax(-1, keepdim=True).float() / qmax).clamp_min(tiny)
            zero = torch.zeros_like(scale)
        else:
            low, high = g.amin(-1, keepdim=True).float(), g.amax(-1, keepdim=True).float()
            scale = ((high - low) / qmax).clamp_min(tiny)
            zero = torch.round(-low / scale).clamp(qmin, qmax)
        return cls(scale, zero, bits, symmetric, tuple(w.shape), group_size)

    @property
    def qmin(self) -> int:
        return code_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.bits, self.symmetric)[1]

    def _check(self, w: Tensor) -> Tensor:
        if tuple(w.shape) != self.shape:
            raise ShapeError(f"quantization: the grid was fitted to {list(self.shape)}, got a tensor "
                             f"{list(w.shape)}")
        return _grouped(w, self.group_size)

    def _out(self, g: Tensor, like: Tensor) -> Tensor:
        return g.reshape(like.shape).to(like.dtype)

    def codes(self, w: Tensor, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> Tensor:
        """Integer codes (as floats) ``clamp(round(w / scale) + zero, qmin, qmax)`` in the grouped
        layout; ``rounding``: ``"nearest"`` (half to even) or ``"stochastic"``."""
        x = self._check(w).float() / self.scale + self.zero
        if rounding == "nearest":
            x = torch.round(x)
        elif rounding == "stochastic":
            x = stochastic_round(x, generator)
        else:
            raise ConfigError(f"quantization: rounding must be 'nearest' or 'stochastic', got "
                              f"{rounding!r}", param="rounding")
        return x.clamp(self.qmin, self.qmax)

    def dequantize(self, codes: Tensor, like: Tensor) -> Tensor:
        """``(codes - zero) * scale``, shaped and typed like ``like``."""
        return self._out((codes - self.zero) * self.scale, like)

    def round(self, w: Tensor, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> Tensor:
        """``w`` moved onto the grid (no gradient)."""
        with torch.no_grad():
            return self.dequantize(self.codes(w, rounding, generator), w)

    def round_ste(self, w: Tensor) -> Tensor:
        """``w`` on the grid forward; backward the straight-through estimator, passing the
        gradient of entries inside the grid's range and zeroing it for clipped ones."""
        g = self._check(w).float()
        x = round_ste(g / self.scale + self.zero)
        return self._out((x.clamp(self.qmin, self.qmax) - self.zero) * self.scale, w)

    def neighbours(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The grid points ``(down, up)`` either side of ``w`` (``down <= w <= up`` inside the
        range; both the end point outside it); equal where ``w`` is on the grid."""
        x = self._check(w.detach()).float() / self.scale + self.zero
        down = torch.floor(x).clamp(self.qmin, self.qmax)
        up = torch.ceil(x).clamp(self.qmin, self.qmax)
        return self.dequantize(down, w), self.dequantize(up, w)

    def contains(self, w: Tensor) -> Tensor:
        """Bool, shaped like ``w``: whether each entry is exactly a grid point."""
        return self.round(w) == w


def _grouped(w: Tensor, group_size: int | None) -> Tensor:
    flat = w.reshape(w.shape[0], -1)
    if group_size is None:
        return flat[:, None, :]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
            or flat.shape[1] % group_size:
        raise ConfigError(f"quantization: group_size must divide the {flat.shape[1]} entries per "
                          f"channel of a {list(w.shape)} tensor, got {group_size!r}", param="group_size")
    return flat.reshape(w.shape[0], -1, group_size)
