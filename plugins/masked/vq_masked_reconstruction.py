"""Vector-quantised masked reconstruction: the visible tokens' encodings snap to their nearest
codeword (straight-through), and a decoder reconstructs the hidden patches from the codes.

Chen et al., "EEGFormer: Towards Transferable and Interpretable Large-Scale EEG Foundation
Model", 2024 (arXiv:2401.10278); the quantiser and its losses are VQ-VAE's (van den Oord, Vinyals
and Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import example_masked_inputs, masked_mse
from sdk.transformer import MaskedDecoder, masked_tokens
from sdk.types import Batch, Loss, Views


def vector_quantize(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z_q, codes, codebook_loss, commitment_loss)`` for ``z [..., D]`` and ``codebook [K, D]``:
    ``codes = argmin_k ||z - e_k||^2``; ``z_q = z + sg(e_codes - z)`` (the value of the codeword,
    the gradient of ``z``: straight-through); ``codebook_loss = ||sg(z) - e||^2`` and
    ``commitment_loss = ||z - sg(e)||^2``, each averaged over the leading dimensions (summed over
    ``D``), per row of the first dimension ``[B]``."""
    flat = z.reshape(-1, z.shape[-1])
    dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T
            + codebook.pow(2).sum(1)[None])
    codes = dist.argmin(1).reshape(z.shape[:-1])
    e = codebook[codes]
    b = z.shape[0]
    codebook_loss = (z.detach() - e).pow(2).sum(-1).reshape(b, -1).mean(1)
    commitment = (z - e.detach()).pow(2).sum(-1).reshape(b, -1).mean(1)
    return z + (e - z).detach(), codes, codebook_loss, commitment


class VQMaskedReconstruction(Objective):
    """A token encoder's visible tokens (``sequence_transformer`` over multichannel time series,
    or ``vit``; ``Views.extras[keys.FEATURES]`` ``[B, 1 + K, embed_dim]``, masked by
    ``patch_masking``) are projected to ``code_dim`` and quantised against a learned codebook of
    ``codebook_size`` vectors (:func:`vector_quantize`); this objective's
    :class:`sdk.transformer.MaskedDecoder` reconstructs every patch from the codes and mask
    tokens. Loss: MSE on the hidden patches (raw, :data:`~sdk.keys.RECONSTRUCTION_TARGET`) plus
    the codebook loss plus ``beta`` times the commitment loss; ``logs['perplexity']`` is
    ``exp`` of the entropy of the batch's code usage."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, num_tokens: Annotated[int, Ge(2)] = 16,
                 grid: tuple[int, ...] | list[int] = (4, 4), patch_dim: Annotated[int, Ge(1)] = 4,
                 embed_dim: Annotated[int, Ge(1)] = 64, code_dim: Annotated[int, Ge(1)] = 16,
                 codebook_size: Annotated[int, Ge(2)] = 256, beta: Annotated[float, Ge(0)] = 0.25,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 2,
                 decoder_heads: Annotated[int, Ge(1)] = 4):
        super().__init__()
        grid = tuple(int(s) for s in grid)
        if not grid or min(grid) < 1 or torch.Size(grid).numel() != num_tokens:
            raise ConfigError(f"vq_masked_reconstruction: grid {grid} does not hold "
                              f"num_tokens={num_tokens} tokens", param="grid")
        self.num_tokens, self.patch_dim, self.embed_dim = num_tokens, patch_dim, embed_dim
        self.beta = beta
        self.project = nn.Linear(embed_dim, code_dim)
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim).uniform_(
            -1 / codebook_size, 1 / codebook_size))
        self.decoder = MaskedDecoder(code_dim, patch_dim, grid, dim=decoder_dim, depth=decoder_depth,
                                     heads=decoder_heads)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'vq_masked_reconstruction'"
        tokens, ids_restore, mask, patches = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_tokens,
            target_dim=self.patch_dim)
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.project.weight.dtype)
        z_q, codes, codebook_loss, commitment = vector_quantize(self.project(tokens), self.codebook)
        recon, per_sample = masked_mse(self.decoder(z_q, ids_restore), patches, mask)
        per_sample = per_sample + codebook_loss.float() + self.beta * commitment.float()
        usage = torch.nn.functional.one_hot(codes.flatten(), self.codebook.shape[0]).sum(0).float()
        p = usage / usage.sum()
        perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
        return Loss(value=recon + codebook_loss.float().mean() + self.beta * commitment.float().mean(),
                    per_sample=per_sample,
                    logs={"reconstruction": recon.detach(), "codebook": codebook_loss.mean().detach(),
                          "commitment": commitment.mean().detach(), "perplexity": perplexity.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        return example_masked_inputs(batch_size, self.num_tokens, 0.5, self.embed_dim, self.patch_dim,
                                     generator=generator)


CARD = Card(
    name="vq_masked_reconstruction", kind="objective",
    title="EEGFormer: Towards Transferable and Interpretable Large-Scale EEG Foundation Model",
    paper="arXiv:2401.10278",
    summary="Quantise the visible tokens' encodings to their nearest codewords (straight-through) "
            "and reconstruct the hidden patches from the codes with a light decoder; VQ-VAE's "
            "codebook and commitment losses train the codebook and keep the encoder committed.",
    formula="z = W enc(x_visible); k = argmin_k ||z - e_k||^2; z_q = z + sg(e_k - z); "
            "x_hat = dec(restore(z_q)); L = sum m ||x_hat - x||^2 / P / sum m "
            "+ ||sg(z) - e_k||^2 + beta ||z - sg(e_k)||^2, beta = 0.25",
    left_out="EEG corpora, the per-channel transformer and the interpretability analyses are not "
             "here: any token encoder over patches of a [B, T, C] series (patch_masking with "
             "sequence_shape) or an image. EEGFormer's own codebook size, masking and loss "
             "weights were not confirmed here; beta = 0.25 and the squared-error codebook loss "
             "are VQ-VAE's (no EMA codebook updates), the codebook of 256 is this module's "
             "default. The class token is quantised and decoded like the others.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VQMaskedReconstruction, card=CARD)
