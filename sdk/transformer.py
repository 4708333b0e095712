"""Transformers over tokens: the body of the ``vit`` and ``sequence_transformer`` encoders and the
lightweight decoder of masked reconstruction (``mae`` and the masked-modelling plugins).

:class:`TokenTransformer` is an :class:`~sdk.interfaces.Encoder` whose subclasses say only how an
input becomes patch vectors (:meth:`TokenTransformer.patches`) and where the tokens sit
(:attr:`TokenTransformer.grid`). It embeds the patches linearly, adds fixed sine-cosine or
learned positions, keeps the visible tokens when the input is marked
(:class:`sdk.masking.Visible`) or ``ids_keep`` is given, prepends a class token and runs
pre-norm ``torch.nn.TransformerEncoder`` blocks and a final LayerNorm. :meth:`features` is the
token embeddings ``[B, 1 + K, D]`` (class token first, then the ``K`` visible tokens in
``ids_keep`` order; ``K = L`` unmasked); the head (:class:`TokenPool`) pools them into the
``[B, D]`` output, the class token or the mean of the patch tokens.

:class:`MaskedDecoder` maps the encoder's visible tokens to a prediction for every token: a
linear embedding to the decoder's width, a learned mask token at every hidden position
(:func:`sdk.masking.restore_tokens`), fixed sine-cosine positions, a few transformer blocks,
LayerNorm and a linear prediction per token (MAE's decoder).
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sdk import keys
from sdk.errors import ConfigError, ShapeError
from sdk.interfaces import Encoder
from sdk.masking import (
    check_mask,
    gather_tokens,
    restore_tokens,
    sincos_1d,
    sincos_2d,
    split_visible,
)
from sdk.types import Batch, Views

POSITIONS = ("sincos", "learned")
POOLS = ("cls", "mean")


def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float,
                       dropout: float = 0.0) -> nn.TransformerEncoder:
    """``depth`` pre-norm blocks (multi-head self-attention and a GELU MLP of ``mlp_ratio * dim``)."""
    if dim % heads:
        raise ConfigError(f"the width {dim} is not divisible by heads={heads}", param="heads")
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(mlp_ratio * dim),
                                       dropout=dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def positions(dim: int, grid: tuple[int, ...]) -> Tensor:
    """Fixed sine-cosine positions ``[L, dim]`` of a 1-D (``(L,)``) or 2-D (``(rows, cols)``) grid."""
    if len(grid) == 2:
        return sincos_2d(dim, (grid[0], grid[1]))
    return sincos_1d(dim, torch.arange(grid[0]))


class TokenPool(nn.Module):
    """``[B, 1 + K, D] -> [B, D]``: the class token (``"cls"``) or the mean of the others (``"mean"``)."""

    def __init__(self, pool: str = "cls"):
        super().__init__()
        self.pool = pool

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)


class TokenTransformer(Encoder):
    """A transformer over patch tokens (see the module's description); subclasses define
    :meth:`patches` and set :attr:`grid` and :attr:`patch_dim` before calling :meth:`build`."""

    plugin: str = "token_transformer"
    """The registry name, in error messages."""
    grid: tuple[int, ...]
    patch_dim: int

    def build(self, *, embed_dim: int, depth: int, heads: int, mlp_ratio: float,
              position: str, pool: str, dropout: float) -> None:
        n = 1
        for side in self.grid:
            n *= side
        self.num_tokens, self.embed_dim, self.out_dim = n, embed_dim, embed_dim
        self.embed = nn.Linear(self.patch_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if position == "sincos":  # the class token's position is zero, as MAE's
            self.register_buffer("pos", torch.cat([torch.zeros(1, embed_dim),
                                                   positions(embed_dim, self.grid)])[None],
                                 persistent=False)
        else:
            self.pos = nn.Parameter(torch.zeros(1, 1 + n, embed_dim))
            nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = transformer_blocks(embed_dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = TokenPool(pool)

    @abc.abstractmethod
    def patches(self, x: Tensor) -> Tensor:
        """The input as patch vectors ``[B, L, patch_dim]`` (checked, with errors naming the
        encoder)."""

    def features(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Token embeddings ``[B, 1 + K, D]``: the class token, then the visible tokens (those of
        ``ids_keep [B, K]``, or of the :class:`~sdk.masking.Visible` input's mark; all when
        neither is given)."""
        x, marked = split_visible(x)
        ids_keep = marked if ids_keep is None else ids_keep
        tokens = self.embed(self.patches(x)) + self.pos[:, 1:].to(x.dtype)
        if ids_keep is not None:
            if (ids_keep.dim() != 2 or ids_keep.shape[0] != x.shape[0]
                    or ids_keep.shape[1] > self.num_tokens or ids_keep.is_floating_point()):
                raise ShapeError(f"encoder {self.plugin!r}: ids_keep must be integer [{x.shape[0]}, K] "
                                 f"with K <= {self.num_tokens} tokens, got {ids_keep.dtype} "
                                 f"{list(ids_keep.shape)}")
            tokens = gather_tokens(tokens, ids_keep)
        cls = (self.cls_token + self.pos[:, :1]).to(tokens.dtype).expand(x.shape[0], -1, -1)
        return self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))

    def forward(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        return self.head(self.features(x, ids_keep))

    def check_input(self, x: Tensor, expected: str) -> None:
        if not x.is_floating_point():
            raise ShapeError(f"encoder {self.plugin!r}: x must be floating {expected}, got {x.dtype} "
                             f"{list(x.shape)}")
        dtype = self.embed.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ShapeError(f"encoder {self.plugin!r}: x is {x.dtype} but the parameters are {dtype} "
                             "(cast one to the other, or run under torch.autocast)")


class MaskedDecoder(nn.Module):
    """MAE's lightweight decoder: visible tokens ``[B, 1 + K, D_enc]`` (class token first) and
    ``ids_restore [B, L]`` -> a prediction ``[B, L, out_dim]`` for every token, in the original
    order (the class token is dropped at the output)."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, ...], *, dim: int = 32,
                 depth: int = 1, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        n = 1
        for side in grid:
            n *= side
        self.in_dim, self.num_tokens = in_dim, n
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", torch.cat([torch.zeros(1, dim), positions(dim, grid)])[None],
                             persistent=False)
        self.blocks = transformer_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def inputs(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """The blocks' input ``[B, 1 + L, dim]``: the embedded class token, then every token in
        the original order (the mask token where hidden), plus the positions."""
        h = self.embed(tokens)
        full = restore_tokens(h[:, 1:], self.mask_token, ids_restore)
        return torch.cat([h[:, :1], full], dim=1) + self.pos.to(h.dtype)

    def head(self, h: Tensor) -> Tensor:
        """Blocks, LayerNorm and the per-token prediction of :meth:`inputs`' output, without
        the class token: ``[B, L, out_dim]``."""
        return self.pred(self.norm(self.blocks(h)))[:, 1:]

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        return self.head(self.inputs(tokens, ids_restore))


def check_tokens(owner: str, tokens: Any, width: int, length: int) -> Tensor:
    """``tokens`` (``Views.extras[keys.FEATURES][0]``) checked to be floating ``[B, 1 + K, width]``
    with ``K < length`` visible tokens: a model whose encoder saw every token (no mask reached
    it) raises :class:`sdk.ShapeError` naming ``owner``."""
    if isinstance(tokens, (tuple, list)):
        tokens = tokens[0]
    if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[2] != width \
            or not tokens.is_floating_point():
        shape = (f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, Tensor)
                 else type(tokens).__name__)
        raise ShapeError(f"{owner}: Views.extras['features'] must be the encoder's tokens, floating "
                         f"[B, 1 + K, {width}] (a token encoder such as vit), got {shape}")
    if tokens.shape[1] - 1 >= length:
        raise ShapeError(f"{owner}: the encoder returned {tokens.shape[1] - 1} tokens of {length}: "
                         "it saw every token; give it the masked input (the patch_masking "
                         "transform marks it with the visible ids)")
    return tokens


class MaskedTokens(NamedTuple):
    """What a masked-modelling objective reads: the encoder's tokens ``[B, 1 + K, D]`` (class
    token first, the ``K`` visible tokens after it), the mask's ``ids_restore`` and ``mask``
    ``[B, L]``, and the reconstruction target ``[B, L, P]``, each checked against the others."""

    tokens: Tensor
    ids_restore: Tensor
    mask: Tensor
    target: Tensor


def masked_tokens(owner: str, views: Views, batch: Batch, *, width: int, length: int,
                  target_dim: int, target: str = "the patches",
                  target_param: str = "patch_dim") -> MaskedTokens:
    """``Views.extras[keys.FEATURES]`` (:func:`check_tokens`), ``Batch.extras`` ``IDS_RESTORE``
    and ``MASK`` (:func:`sdk.masking.check_mask`) and ``RECONSTRUCTION_TARGET`` ``[B, length,
    target_dim]`` (``target``: what it holds, ``target_param``: the parameter giving its width,
    both for the message) of one batch, or :class:`sdk.ShapeError` naming ``owner``. Metadata
    only: no host-device sync."""
    tokens = check_tokens(owner, views.extras[keys.FEATURES], width, length)
    ids_restore, mask = batch.extras[keys.IDS_RESTORE], batch.extras[keys.MASK]
    check_mask(owner, ids_restore, mask, length)
    wanted = batch.extras[keys.RECONSTRUCTION_TARGET]
    b = tokens.shape[0]
    if (not isinstance(wanted, Tensor) or wanted.shape != (b, length, target_dim)
            or ids_restore.shape[0] != b):
        raise ShapeError(f"{owner}: Batch.extras[{keys.RECONSTRUCTION_TARGET!r}] must be {target} "
                         f"[{b}, {length}, {target_dim}] ({target_param}) and the mask of {b} rows, "
                         f"got {list(getattr(wanted, 'shape', []))} and {list(ids_restore.shape)}")
    return MaskedTokens(tokens, ids_restore, mask, wanted)
