"""A transformer encoder over sequences [B, T, D] (spectrogram frames, EEG channels, tokens) that
runs on the visible steps only.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (the encoder stack, with pre-norm
blocks and a class token as BERT / ViT).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.masking import patchify_sequence
from sdk.transformer import POOLS, POSITIONS, TokenTransformer


class SequenceTransformer(TokenTransformer):
    """Sequences ``[B, seq_len, in_features]`` (or flat ``[B, seq_len * in_features]``) -> runs of
    ``patch_size`` steps as tokens -> linear embedding + 1-D positions -> class token +
    transformer blocks -> LayerNorm. ``features(x)`` is the tokens ``[B, 1 + K, embed_dim]``,
    the output their pool ``[B, embed_dim]``; a :func:`sdk.masking.visible` input or ``ids_keep``
    keeps ``K`` tokens only. ``in_dim`` (a recipe's flat feature count) must equal
    ``seq_len * in_features``."""

    plugin = "sequence_transformer"

    def __init__(self, seq_len: Annotated[int, Ge(1)] = 16, in_features: Annotated[int, Ge(1)] = 4,
                 in_dim: Annotated[int | None, FromData("in_dim")] = None,
                 patch_size: Annotated[int, Ge(1)] = 1, embed_dim: Annotated[int, Ge(2)] = 64,
                 depth: Annotated[int, Ge(1)] = 4, heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 2.0,
                 positions: Annotated[str, one_of(POSITIONS)] = "sincos",
                 pool: Annotated[str, one_of(POOLS)] = "cls",
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0):
        super().__init__()
        if seq_len % patch_size:
            raise ConfigError(f"sequence_transformer: seq_len={seq_len} is not a multiple of "
                              f"patch_size={patch_size}", param="patch_size")
        if in_dim is not None and in_dim != seq_len * in_features:
            raise ConfigError(f"sequence_transformer: in_dim={in_dim} is not seq_len x in_features "
                              f"= {seq_len * in_features}", param="in_dim")
        self.seq_len, self.in_features, self.patch_size = seq_len, in_features, patch_size
        self.in_dim = seq_len * in_features
        self.grid, self.patch_dim = (seq_len // patch_size,), patch_size * in_features
        self.build(embed_dim=embed_dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                   position=positions, pool=pool, dropout=dropout)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        t, d = self.seq_len, self.in_features
        self.check_input(x, f"[B, {t}, {d}] or flat [B, {t * d}]")
        if x.dim() == 2 and x.shape[1] == t * d:
            x = x.reshape(x.shape[0], t, d)
        if x.dim() != 3 or tuple(x.shape[1:]) != (t, d):
            raise ShapeError(f"encoder {self.plugin!r}: x must be [B, {t}, {d}] or flat [B, {t * d}], "
                             f"got {list(x.shape)}")
        return patchify_sequence(x, self.patch_size)


CARD = Card(
    name="sequence_transformer", kind="encoder", title="Attention Is All You Need (encoder)",
    paper="arXiv:1706.03762",
    summary="Transformer encoder over [B, T, D] sequences (runs of patch_size steps as tokens) "
            "with a class token; runs on the visible tokens only under a keep-mask.",
    formula="z_0 = [cls; E s_1; ...; E s_L] + P (kept tokens only under a mask); pre-norm "
            "blocks z_l = z_{l-1} + MSA(LN(.)) + MLP(LN(.)); output = LN(z)[:, 0] or the mean",
    left_out="Pre-norm blocks with GELU (the paper's are post-norm with ReLU); a class token and "
             "fixed sine-cosine (or learned) positions; tiny defaults (embed_dim 64, depth 4, "
             "4 heads); no decoder (masked reconstruction objectives own theirs).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SequenceTransformer, card=CARD)
