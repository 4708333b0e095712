"""MAE: reconstruct the pixels of the hidden patches from the visible ones.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk import keys
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import (
    example_masked_inputs,
    masked_mse,
    normalized_patches,
    reconstruction_layout,
)
from sdk.transformer import MaskedDecoder, masked_tokens
from sdk.types import Batch, Loss, Views


def mae_loss(prediction: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, *,
             norm_pix_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, per_sample)``: the mean squared error between ``prediction [B, L, P]`` and the
    patches ``[B, L, P]`` (each standardised by its own mean and variance when
    ``norm_pix_loss``) over the hidden patches (``mask [B, L]``, 1 = hidden) only."""
    target = normalized_patches(patches.float()) if norm_pix_loss else patches
    return masked_mse(prediction, target, mask)


class MAE(Objective):
    """The MAE objective and its decoder (:class:`sdk.transformer.MaskedDecoder`).

    Takes the encoder's visible tokens ``Views.extras[keys.FEATURES]`` ``[B, 1 + K, embed_dim]``
    (a token encoder, ``vit``, fed by the ``patch_masking`` transform, whose mask ratio is MAE's
    0.75 by default) and ``Batch.extras`` :data:`~sdk.keys.MASK`, :data:`~sdk.keys.IDS_RESTORE`
    and :data:`~sdk.keys.RECONSTRUCTION_TARGET` (the raw patches) from the transform; the
    decoder predicts every patch of an ``image_shape`` image of ``patch_size`` patches and the
    loss is the squared error on the hidden patches only.

    The decoder is the objective's, not the encoder's: only the pre-training branch uses it, no
    teacher copies it, and it is discarded downstream (the encoder alone is embedded, probed and
    exported)."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, embed_dim: Annotated[int, Ge(1)] = 64,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 2,
                 decoder_heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 4.0, norm_pix_loss: bool = True):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        grid, self.num_patches, self.patch_dim = reconstruction_layout("mae", self.image_shape,
                                                                       patch_size, norm_pix_loss)
        self.embed_dim, self.norm_pix_loss = embed_dim, norm_pix_loss
        self.decoder = MaskedDecoder(embed_dim, self.patch_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads, mlp_ratio=mlp_ratio)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'mae'"
        tokens, ids_restore, mask, patches = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_patches,
            target_dim=self.patch_dim)
        if not torch.is_autocast_enabled(tokens.device.type):  # bf16 tokens, float32 decoder
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        prediction = self.decoder(tokens, ids_restore)
        value, per_sample = mae_loss(prediction, patches, mask, norm_pix_loss=self.norm_pix_loss)
        return Loss(value=value, per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        return example_masked_inputs(batch_size, self.num_patches, 0.75, self.embed_dim, self.patch_dim,
                                     generator=generator)


CARD = Card(
    name="mae", kind="objective", title="Masked Autoencoders Are Scalable Vision Learners (MAE)",
    paper="arXiv:2111.06377",
    summary="Encode the visible 25% of patches, decode every patch with a light transformer from "
            "mask tokens, and regress the hidden patches' normalised pixels.",
    formula="x_hat = dec(restore([enc(x_visible); mask tokens], ids_restore)); "
            "t_l = (x_l - mean(x_l)) / sqrt(var(x_l) + 1e-6); "
            "L = sum_i sum_l m_il ||x_hat_il - t_il||^2 / P / sum m",
    left_out="Masking (ratio 0.75, per sample) is the patch_masking transform's, which the recipe "
             "pairs with the objective. Tiny decoder for 8x8 digits (width 32, 2 blocks, 4 heads) "
             "instead of 512 x 8 blocks; the crop/flip augmentation and the fine-tuning recipe are "
             "not part of the loss. norm_pix_loss defaults to True (the paper's better setting; "
             "the authors' code defaults to False).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MAE, card=CARD)
