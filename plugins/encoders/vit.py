"""A small Vision Transformer over image patches that runs on the visible patches only.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021; the visible-token input and fixed 2-D sine-cosine positions as in He et al.'s MAE.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.masking import as_image, image_grid, patchify
from sdk.transformer import POOLS, POSITIONS, TokenTransformer


class ViT(TokenTransformer):
    """Images ``[B, C, H, W]`` (or flat ``[B, C*H*W]``, reshaped here to ``image_shape``: the
    digits' 64 features become ``[1, 8, 8]`` in the encoder) -> ``p x p`` patches -> linear
    embedding + positions -> class token + ``depth`` transformer blocks -> LayerNorm.

    ``features(x)`` is the token embeddings ``[B, 1 + K, embed_dim]``; ``vit(x)`` pools them
    (``pool``: the class token or the mean of the patch tokens) into ``[B, embed_dim]``. An input
    marked by :func:`sdk.masking.visible` (the ``patch_masking`` transform's output), or
    ``ids_keep=`` given to ``features`` / ``forward``, runs the blocks on those ``K`` patches only.
    Tiny defaults train on digits' 8x8 images with 2x2 patches (16 tokens)."""

    plugin = "vit"

    def __init__(self, in_dim: Annotated[int | None, FromData("in_dim")] = None,
                 image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, embed_dim: Annotated[int, Ge(4)] = 64,
                 depth: Annotated[int, Ge(1)] = 4, heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 2.0,
                 positions: Annotated[str, one_of(POSITIONS)] = "sincos",
                 pool: Annotated[str, one_of(POOLS)] = "cls",
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.grid = image_grid("vit", self.image_shape, patch_size)
        c, h, w = self.image_shape
        if in_dim is not None and in_dim != c * h * w:
            raise ConfigError(f"vit: in_dim={in_dim} is not the image_shape's {c}x{h}x{w} = "
                              f"{c * h * w} values", param="in_dim")
        self.in_dim, self.patch_size = c * h * w, patch_size
        self.patch_dim = patch_size * patch_size * c
        self.build(embed_dim=embed_dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                   position=positions, pool=pool, dropout=dropout)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        self.check_input(x, f"images [B, {c}, {h}, {w}] or flat [B, {self.in_dim}]")
        return patchify(as_image(f"encoder {self.plugin!r}", x, self.image_shape), self.patch_size)


CARD = Card(
    name="vit", kind="encoder",
    title="An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale (ViT)",
    paper="arXiv:2010.11929",
    summary="Vision Transformer over p x p patches with a class token; runs on the visible "
            "patches only when the input carries a keep-mask (MAE's encoder).",
    formula="z_0 = [cls; E x_p^1; ...; E x_p^L] + E_pos (only the kept patches under a mask); "
            "z_l = z_{l-1} + MSA(LN(z_{l-1})) + MLP(LN(.)); features = LN(z_depth); "
            "output = features[:, 0] (pool='cls') or the mean of the patch tokens",
    left_out="Tiny defaults for 8x8 digits (embed_dim 64, depth 4, 4 heads, MLP ratio 2, 2x2 "
             "patches) instead of ViT-B/16; the patch embedding is a linear map of the patchified "
             "pixels (equal to the paper's stride-p convolution); sine-cosine 2-D positions by "
             "default (MAE's; the paper's ViT learns them: positions='learned'); no stochastic "
             "depth; the classification head is left to the objective or a linear probe.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ViT, card=CARD)
