"""Masked spectrogram patch modelling (MSPM): at every hidden patch, identify the patch among the
sample's hidden patches (InfoNCE) and reconstruct it (MSE), jointly.

Gong et al., "SSAST: Self-Supervised Audio Spectrogram Transformer", AAAI 2022
(arXiv:2110.09784); Shams et al., "SSAMBA: Self-Supervised Audio Representation Learning with
Mamba State Space Models", 2024 (arXiv:2405.11831), which trains Mamba with the same objective.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import example_masked_inputs, gather_tokens, hidden_ids
from sdk.transformer import MaskedDecoder, masked_tokens
from sdk.types import Batch, Loss, Views


def mspm_loss(c: Tensor, g: Tensor, x: Tensor, gen_weight: float = 10.0
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(per_sample, discriminative, generative, accuracy)``, each ``[B]``, for the ``N`` hidden
    patches of each sample: ``c [B, N, P]`` (the classification head's output), ``g [B, N, P]``
    (the reconstruction head's) and the patches ``x [B, N, P]``. Discriminative:
    ``-(1/N) sum_i log softmax_j(c_i . x_j)[i]`` (each patch among the sample's hidden patches);
    generative: ``mean_{i,p} (g_ip - x_ip)^2``; ``per_sample = disc + gen_weight * gen``. In
    float32."""
    c, g, x = c.float(), g.float(), x.float()
    logits = c @ x.transpose(1, 2)  # [B, N, N]: head output i, patch j
    target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    disc = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
    gen = (g - x).pow(2).mean((1, 2))
    accuracy = (logits.argmax(2) == target).float().mean(1)
    return disc + gen_weight * gen, disc, gen, accuracy


def _head(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


class MaskedSpectrogramPatchModeling(Objective):
    """The visible patch tokens of a token encoder (``sequence_transformer`` on spectrogram frames,
    or ``vit``; ``Views.extras[keys.FEATURES]`` ``[B, 1 + K, embed_dim]``, masked by
    ``patch_masking``) go through this objective's :class:`sdk.transformer.MaskedDecoder` (a mask
    token at every hidden position) to an output ``O_i`` per token; at the hidden ones, SSAST's
    two heads (two-layer MLPs) give ``c_i = r(O_i)`` and ``g_i = g(O_i)``, compared with the raw
    patches :data:`~sdk.keys.RECONSTRUCTION_TARGET` by :func:`mspm_loss`. Each sample needs at
    least two hidden patches."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, num_tokens: Annotated[int, Ge(2)] = 16,
                 grid: tuple[int, ...] | list[int] = (4, 4), patch_dim: Annotated[int, Ge(1)] = 4,
                 embed_dim: Annotated[int, Ge(1)] = 64, gen_weight: Annotated[float, Ge(0)] = 10.0,
                 head_hidden: Annotated[int, Ge(1)] = 64, decoder_dim: Annotated[int, Ge(4)] = 32,
                 decoder_depth: Annotated[int, Ge(1)] = 1, decoder_heads: Annotated[int, Ge(1)] = 4):
        super().__init__()
        grid = tuple(int(s) for s in grid)
        if not grid or min(grid) < 1 or torch.Size(grid).numel() != num_tokens:
            raise ConfigError(f"masked_spectrogram_patch_modeling: grid {grid} does not hold "
                              f"num_tokens={num_tokens} tokens", param="grid")
        self.num_tokens, self.patch_dim, self.embed_dim = num_tokens, patch_dim, embed_dim
        self.gen_weight = gen_weight
        self.decoder = MaskedDecoder(embed_dim, decoder_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads)
        self.classify = _head(decoder_dim, head_hidden, patch_dim)
        self.reconstruct = _head(decoder_dim, head_hidden, patch_dim)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'masked_spectrogram_patch_modeling'"
        tokens, ids_restore, mask, patches = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_tokens,
            target_dim=self.patch_dim)
        n_visible = tokens.shape[1] - 1
        if self.num_tokens - n_visible < 2:
            raise ShapeError(f"{owner}: {self.num_tokens - n_visible} hidden patch per sample; the "
                             "discriminative term picks each among the others, so at least 2 must "
                             "be hidden")
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        hidden = hidden_ids(ids_restore, n_visible)
        out = gather_tokens(self.decoder(tokens, ids_restore), hidden)  # [B, N, decoder_dim]
        x = gather_tokens(patches.to(out.dtype), hidden)
        per_sample, disc, gen, acc = mspm_loss(self.classify(out), self.reconstruct(out), x,
                                               self.gen_weight)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"discriminative": disc.mean().detach(), "generative": gen.mean().detach(),
                          "accuracy": acc.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        return example_masked_inputs(batch_size, self.num_tokens, 0.75, self.embed_dim, self.patch_dim,
                                     generator=generator)


CARD = Card(
    name="masked_spectrogram_patch_modeling", kind="objective",
    title="SSAST: Self-Supervised Audio Spectrogram Transformer (MSPM; also SSAMBA)",
    paper="arXiv:2110.09784",
    summary="Joint discriminative and generative masked patch modelling: at each hidden "
            "spectrogram patch, a classification head picks the patch among the sample's hidden "
            "patches (InfoNCE) and a reconstruction head regresses it (MSE, weighted 10).",
    formula="c_i = r(O_i), g_i = g(O_i) at hidden patches i (N per sample); "
            "L_d = -(1/N) sum_i log(exp(c_i . x_i) / sum_j exp(c_i . x_j)); "
            "L_g = (1/N) sum_i mean_p (g_ip - x_ip)^2; L = L_d + 10 L_g",
    left_out="SSAST's encoder sees every patch with a mask embedding at the hidden ones (BERT "
             "style) and masks patches in clusters (400 of 512 for 16x16 spectrogram patches); "
             "here a token encoder sees the visible patches only and this objective's light "
             "decoder puts mask tokens back (MAE style), and the masking is patch_masking's "
             "(random or block-wise; sequence_shape for frames). The audio transformer (SSAST) "
             "and Mamba (SSAMBA) backbones, AudioSet/LibriSpeech pre-training and fine-tuning are "
             "not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MaskedSpectrogramPatchModeling, card=CARD)
