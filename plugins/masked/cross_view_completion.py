"""CroCo: reconstruct the hidden patches of a heavily masked view from its visible patches and a
second, unmasked view of the same scene (cross-attention in the decoder).

Weinzaepfel et al., "CroCo: Self-Supervised Pre-training for 3D Vision Tasks by Cross-View
Completion", NeurIPS 2022; "CroCo v2: Improved Cross-view Completion Pre-training for Stereo
Matching and Optical Flow", ICCV 2023 (arXiv:2211.10408).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import (
    check_mask,
    masked_mse,
    normalized_patches,
    random_mask,
    reconstruction_layout,
    restore_tokens,
)
from sdk.transformer import check_tokens, positions
from sdk.types import Batch, Loss, Views


class CrossViewDecoder(nn.Module):
    """CroCo's decoder: the first view's visible tokens ``[B, 1 + K, D_enc]`` (class token first)
    with a mask token at every hidden position, and the second view's tokens ``[B, 1 + L,
    D_enc]``, both embedded to ``dim`` with fixed sine-cosine positions (zero for the class
    tokens); ``depth`` pre-norm blocks of self-attention, cross-attention to the (LayerNorm-ed)
    second view and an MLP; LayerNorm and a linear prediction per token, the class token dropped:
    ``[B, L, out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, ...], *, dim: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", torch.cat([torch.zeros(1, dim), positions(dim, grid)])[None],
                             persistent=False)
        layer = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=int(mlp_ratio * dim), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, depth)
        self.memory_norm = nn.LayerNorm(dim)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, first: Tensor, ids_restore: Tensor, second: Tensor) -> Tensor:
        e1 = self.embed(first)
        h1 = torch.cat([e1[:, :1], restore_tokens(e1[:, 1:], self.mask_token, ids_restore)], 1) + self.pos
        h2 = self.embed(second) + self.pos
        return self.pred(self.norm(self.blocks(h1, self.memory_norm(h2))))[:, 1:]


class CrossViewCompletion(Objective):
    """Two views through one (Siamese) token encoder: view 0 masked (``patch_masking``, CroCo's
    ratio 0.9; its ``Batch.extras`` :data:`~sdk.keys.MASK`, :data:`~sdk.keys.IDS_RESTORE` and raw
    patches :data:`~sdk.keys.RECONSTRUCTION_TARGET`), view 1 whole (no transform, or one that
    leaves the mask alone). ``Views.extras[keys.FEATURES]`` holds ``[B, 1 + K, embed_dim]`` and
    ``[B, 1 + L, embed_dim]``; :class:`CrossViewDecoder` predicts every patch of view 0 and the
    loss is MAE's squared error on the hidden patches only (each standardised when
    ``norm_pix_loss``)."""

    requires = {"views": 2, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, embed_dim: Annotated[int, Ge(1)] = 64,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 2,
                 decoder_heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 4.0, norm_pix_loss: bool = True):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        grid, self.num_patches, self.patch_dim = reconstruction_layout(
            "cross_view_completion", self.image_shape, patch_size, norm_pix_loss)
        self.embed_dim, self.norm_pix_loss = embed_dim, norm_pix_loss
        self.decoder = CrossViewDecoder(embed_dim, self.patch_dim, grid, dim=decoder_dim,
                                        depth=decoder_depth, heads=decoder_heads, mlp_ratio=mlp_ratio)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'cross_view_completion'"
        feats = views.extras[keys.FEATURES]
        if not isinstance(feats, (tuple, list)) or len(feats) < 2:
            raise ShapeError(f"{owner}: Views.extras['features'] must hold the tokens of two views "
                             "(the masked view, then the whole second view)")
        first = check_tokens(owner, feats[0], self.embed_dim, self.num_patches)
        second = feats[1]
        b = first.shape[0]
        if (not isinstance(second, Tensor) or second.shape != (b, 1 + self.num_patches, self.embed_dim)
                or not second.is_floating_point()):
            raise ShapeError(f"{owner}: the second view's tokens must be whole, floating [{b}, "
                             f"{1 + self.num_patches}, {self.embed_dim}] (no mask on view 1), got "
                             f"{list(getattr(second, 'shape', []))}")
        ids_restore, mask = batch.extras[keys.IDS_RESTORE], batch.extras[keys.MASK]
        patches = batch.extras[keys.RECONSTRUCTION_TARGET]
        check_mask(owner, ids_restore, mask, self.num_patches)
        if patches.shape != (b, self.num_patches, self.patch_dim) or ids_restore.shape[0] != b:
            raise ShapeError(f"{owner}: Batch.extras[{keys.RECONSTRUCTION_TARGET!r}] must be the first "
                             f"view's patches [{b}, {self.num_patches}, {self.patch_dim}] and the mask "
                             f"of {b} rows, got {list(patches.shape)} and {list(ids_restore.shape)}")
        if not torch.is_autocast_enabled(first.device.type):
            dtype = self.decoder.embed.weight.dtype
            first, second = first.to(dtype), second.to(dtype)
        prediction = self.decoder(first, ids_restore, second)
        target = normalized_patches(patches.float()) if self.norm_pix_loss else patches
        value, per_sample = masked_mse(prediction, target, mask)
        return Loss(value=value, per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        m = random_mask(batch_size, self.num_patches, 0.9, generator=generator)
        first = torch.randn(batch_size, 1 + m.ids_keep.shape[1], self.embed_dim,
                            generator=generator).requires_grad_()
        second = torch.randn(batch_size, 1 + self.num_patches, self.embed_dim,
                             generator=generator).requires_grad_()
        views = Views(embeddings=(first[:, 0].detach(), second[:, 0].detach()),
                      extras={keys.FEATURES: (first, second)})
        batch = Batch(index=torch.arange(batch_size), extras={
            keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
            keys.RECONSTRUCTION_TARGET: torch.rand(batch_size, self.num_patches, self.patch_dim,
                                                   generator=generator)})
        return views, batch


CARD = Card(
    name="cross_view_completion", kind="objective",
    title="CroCo v2: Improved Cross-view Completion Pre-training for Stereo Matching and Optical Flow",
    paper="arXiv:2211.10408",
    summary="Mask 90% of one view, encode its visible patches and a whole second view with the "
            "same encoder, and reconstruct the hidden patches with a decoder that cross-attends "
            "to the second view; squared error on hidden patches only.",
    formula="x_hat = dec(restore([enc(x1_visible); mask tokens]) + pos, memory = enc(x2) + pos); "
            "t_l = (x1_l - mean) / sqrt(var + 1e-6); L = sum_il m_il ||x_hat_il - t_il||^2 / P / "
            "sum m",
    left_out="Masking is the patch_masking transform's on the first view (mask_ratio=0.9 there, "
             "CroCo's). Stereo and flow pairs (real-world, synthetic Habitat) are not here: any "
             "second view the user provides (on digits, an augmentation of the same image). "
             "CroCo v2's RoPE positions are sine-cosine absolute positions here; one LayerNorm "
             "normalises the second view before every block (CroCo normalises it inside each "
             "block); tiny decoder for 8x8 digits; no downstream stereo/flow heads.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CrossViewCompletion, card=CARD)
