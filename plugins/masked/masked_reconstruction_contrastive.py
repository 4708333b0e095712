"""SiT: reconstruct the corrupted patches of a view (L1) and contrast two views' embeddings
(NT-Xent), the tasks' weights learned as homoscedastic uncertainties.

Atito, Awais and Kittler, "SiT: Self-supervised vIsion Transformer", 2021 (arXiv:2104.03602).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.contrastive import NTXent
from sdk.distributed import Gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import masked_mean, random_mask, reconstruction_layout
from sdk.transformer import MaskedDecoder, masked_tokens
from sdk.types import Batch, Loss, Views


def uncertainty_weighted(loss: Tensor, s: Tensor, scale: float) -> Tensor:
    """SiT's learned task weighting: ``scale * exp(-s) * loss + s / 2`` (``s`` a learned log
    variance; ``scale`` 1 for the contrastive term, 1/2 for the L1 reconstruction)."""
    return scale * torch.exp(-s) * loss + 0.5 * s


class MaskedReconstructionContrastive(Objective):
    """Two views: the first masked by ``patch_masking`` and encoded by a token encoder (its
    visible tokens ``Views.extras[keys.FEATURES][0]`` ``[B, 1 + K, embed_dim]``, the mask and
    the raw patches :data:`~sdk.keys.RECONSTRUCTION_TARGET` in ``Batch.extras``), the second
    (and any further one) by another transform only. This objective's
    :class:`sdk.transformer.MaskedDecoder` predicts every patch of the first view from its
    visible tokens and mask tokens; the reconstruction loss is the L1 error averaged over the
    hidden patches only. The contrastive loss is NT-Xent (temperature 0.5, gathered under DDP)
    between the views' embeddings ``Views.embeddings``. With ``uncertainty_weighting``, ``L =
    exp(-s_c) L_c + s_c / 2 + exp(-s_r) L_r / 2 + s_r / 2`` with learned ``s_c, s_r`` (initially
    0); otherwise ``L = L_r + contrastive_weight * L_c``."""

    requires = {"views": 2, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = True

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, embed_dim: Annotated[int, Ge(1)] = 64,
                 temperature: Annotated[float, Gt(0)] = 0.5, uncertainty_weighting: bool = True,
                 contrastive_weight: Annotated[float, Ge(0)] = 1.0,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 1,
                 decoder_heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 4.0, gather: Gather = "auto"):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        grid, self.num_patches, self.patch_dim = reconstruction_layout(
            "masked_reconstruction_contrastive", self.image_shape, patch_size, False)
        self.embed_dim, self.uncertainty_weighting = embed_dim, uncertainty_weighting
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.contrast = NTXent(temperature=temperature, gather=gather)
        self.decoder = MaskedDecoder(embed_dim, self.patch_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads, mlp_ratio=mlp_ratio)
        if uncertainty_weighting:
            self.log_var_contrastive = nn.Parameter(torch.zeros(()))
            self.log_var_reconstruction = nn.Parameter(torch.zeros(()))

    def reconstruction(self, tokens: Tensor, ids_restore: Tensor, patches: Tensor,
                       mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(value, per_sample)``: the mean absolute error of the decoded patches over the hidden
        patches (``mask`` 1) only, each patch's error averaged over its values (float32, or
        float64 for float64 inputs)."""
        pred = self.decoder(tokens, ids_restore)
        dtype = torch.promote_types(pred.dtype, torch.float32)
        err = (pred.to(dtype) - patches.to(dtype)).abs().mean(-1)
        return masked_mean(err, mask)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'masked_reconstruction_contrastive'"
        tokens, ids_restore, mask, patches = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_patches,
            target_dim=self.patch_dim)
        b = tokens.shape[0]
        if views.batch_size != b:
            raise ShapeError(f"{owner}: Views.embeddings hold {views.batch_size} rows and the first "
                             f"view's tokens {b}")
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        rec, rec_per = self.reconstruction(tokens, ids_restore, patches, mask)
        con = self.contrast(Views(embeddings=views.embeddings), batch)
        con_value, con_per = con.value.to(rec.dtype), con.per_sample.to(rec.dtype)
        if self.uncertainty_weighting:
            s_c, s_r = self.log_var_contrastive, self.log_var_reconstruction
            value = uncertainty_weighted(con_value, s_c, 1.0) + uncertainty_weighted(rec, s_r, 0.5)
            per_sample = (uncertainty_weighted(con_per, s_c, 1.0)
                          + uncertainty_weighted(rec_per, s_r, 0.5))
        else:
            value = rec + self.contrastive_weight * con_value
            per_sample = rec_per + self.contrastive_weight * con_per
        return Loss(value=value, per_sample=per_sample,
                    logs={"reconstruction": rec.detach(), "contrastive": con_value.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        m = random_mask(batch_size, self.num_patches, 0.5, generator=generator)
        tokens = torch.randn(batch_size, 1 + m.ids_keep.shape[1], self.embed_dim,
                             generator=generator).requires_grad_()
        second = torch.randn(batch_size, self.embed_dim, generator=generator).requires_grad_()
        views = Views(embeddings=(tokens[:, 0], second), extras={keys.FEATURES: (tokens,)})
        batch = Batch(index=torch.arange(batch_size), extras={
            keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
            keys.RECONSTRUCTION_TARGET: torch.rand(batch_size, self.num_patches, self.patch_dim,
                                                   generator=generator)})
        return views, batch


CARD = Card(
    name="masked_reconstruction_contrastive", kind="objective",
    title="SiT: Self-supervised vIsion Transformer",
    paper="arXiv:2104.03602",
    summary="Masked image reconstruction (L1 on the corrupted patches, from a light decoder) "
            "jointly with NT-Xent between two views' embeddings, the two tasks weighted by "
            "learned homoscedastic uncertainties as in the authors' code.",
    formula="L_r = sum_i sum_l m_il mean_p |dec(enc(x_visible))_ilp - x_ilp| / sum m; "
            "L_c = NT-Xent(z_1, z_2; tau = 0.5); "
            "L = exp(-s_c) L_c + s_c / 2 + exp(-s_r) L_r / 2 + s_r / 2 (s learned, init 0)",
    left_out="SiT also predicts the image's rotation (0/90/180/270 degrees) from a rotation token "
             "(cross-entropy, weight exp(-s) + s / 2); rotated inputs and their labels need a "
             "rotation transform not here, so that head is left out. SiT's corruption is "
             "random-size blocks of noise, patches of another image, greyed and blurred regions "
             "fed to an encoder that sees every patch, and its first code computes the L1 over "
             "the whole image; here the corruption is patch_masking's (the encoder sees the "
             "visible patches only, a light decoder puts mask tokens back, MAE style) and the L1 "
             "counts the hidden patches only (the group-masked modelling form). The ViT-S/B "
             "backbones and the contrastive token's own head are not here (the views' pooled "
             "embeddings are contrasted; a projection_head encoder can add the head).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MaskedReconstructionContrastive, card=CARD)
