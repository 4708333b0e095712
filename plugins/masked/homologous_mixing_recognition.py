"""MixedAE: mix the patches of a group of images into one input per image, reconstruct each image
from its own patches in the mixed input, and make every patch recognise its homologous patches
(those from the same image) with a contrastive loss over the mixed input's patches.

Chen, Liu, Hong, Xu, Li and Yeung, "Mixed Autoencoder for Self-supervised Visual Representation
Learning", CVPR 2023 (arXiv:2303.17152).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.masking import (
    as_image,
    check_mask,
    gather_tokens,
    image_grid,
    mask_from_keys,
    masked_mse,
    normalized_patches,
    patchify,
    reconstruction_layout,
    unpatchify,
)
from sdk.transformer import MaskedDecoder
from sdk.types import Batch, Loss, Views

NAME = "homologous_mixing_recognition"


def _layout(owner: str, image_shape, patch_size: int, group_size: int) -> tuple[tuple[int, int], int]:
    grid = image_grid(owner, image_shape, patch_size)
    length = grid[0] * grid[1]
    if length % group_size or length // group_size < 2:
        raise ConfigError(f"{owner}: the {length} patches must split into group_size={group_size} "
                          "equal shares of at least 2 patches (each patch needs a homologous "
                          "partner)", param="group_size")
    return grid, length


def mixing_sources(batch: int, length: int, group_size: int, *,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """``[B, L]``: the batch row whose patch each mixed sample takes at each position. Rows form
    groups of ``group_size`` consecutive samples; in each group a random assignment gives every
    position an offset ``o_l`` in ``0..n-1``, each offset on ``L / n`` positions, and mixed sample
    ``j`` of the group takes member ``(j + o_l) mod n`` there: every mixed sample holds exactly
    ``L / n`` patches of each member (its own where ``o_l = 0``), and every patch of every member
    is used exactly once."""
    groups = batch // group_size
    if generator is not None:
        noise = torch.rand(groups, length, generator=generator, device=generator.device).to(device)
    else:
        noise = torch.rand(groups, length, device=device)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    offset = rank % group_size  # [G, L]: each offset on L / n positions
    member = torch.arange(group_size, device=offset.device)
    within = (member[None, :, None] + offset[:, None, :]) % group_size  # [G, n, L]
    start = torch.arange(groups, device=offset.device)[:, None, None] * group_size
    return (start + within).reshape(batch, length)


def mix_patches(patches: Tensor, sources: Tensor) -> Tensor:
    """``[B, L, P]``: ``patches[sources[b, l], l]`` (the mixed input of every sample)."""
    positions = torch.arange(patches.shape[1], device=patches.device).expand_as(sources)
    return patches[sources, positions]


def homologous_contrastive(tokens: Tensor, sources: Tensor, temperature: float) -> Tensor:
    """``[B]``: per mixed sample, the mean over its patches ``l`` of
    ``-(1/|P_l|) sum_{p in P_l} log(exp(s_lp / t) / sum_{k != l} exp(s_lk / t))``, ``s`` the cosine
    similarity of the patch tokens ``[B, L, D]`` and ``P_l`` the other patches of ``l``'s source
    (``sources [B, L]``): supervised contrast with the source images as the classes."""
    z = F.normalize(tokens, dim=-1)
    sim = z @ z.transpose(1, 2) / temperature  # [B, L, L]
    eye = torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(-1)
    positive = (sources[:, :, None] == sources[:, None, :]) & ~eye
    pos = positive.to(log_prob.dtype)
    nll = -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(-1) / pos.sum(-1).clamp_min(1)
    return nll.mean(1)


class HomologousMixing(Transform):
    """``(x, batch) -> (mixed x, batch + extras)``: images ``[B, C, H, W]`` or flat ``[B, C*H*W]``
    of ``image_shape`` in ``patch_size`` patches, ``B`` a multiple of ``group_size``. Each sample's
    input becomes the mix of :func:`mixing_sources` (mixing ratio ``1 / group_size`` of its own
    patches), in the input's layout, for an encoder that sees every token. ``Batch.extras`` gains
    :data:`~sdk.keys.MIXING_SOURCE` ``[B, L]``, :data:`~sdk.keys.MASK` (1 where the patch is
    another image's), :data:`~sdk.keys.IDS_RESTORE` (the own patches first) and
    :data:`~sdk.keys.RECONSTRUCTION_TARGET`, the sample's own unmixed patches ``[B, L, P]``."""

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, group_size: Annotated[int, Ge(2)] = 4):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.grid, self.length = _layout(NAME, self.image_shape, patch_size, group_size)
        self.patch_size, self.group_size = patch_size, group_size

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        owner = f"transform {NAME!r}"
        images = as_image(owner, x, self.image_shape)
        b = images.shape[0]
        if b % self.group_size:
            raise ShapeError(f"{owner}: the batch of {b} does not split into groups of "
                             f"group_size={self.group_size} images")
        patches = patchify(images, self.patch_size)
        sources = mixing_sources(b, self.length, self.group_size, device=x.device)
        mixed = unpatchify(mix_patches(patches, sources), self.patch_size, self.image_shape)
        mask = (sources != torch.arange(b, device=x.device)[:, None]).float()
        restore = mask_from_keys(mask, self.length - self.length // self.group_size).ids_restore
        extras = {**batch.extras, keys.MIXING_SOURCE: sources, keys.MASK: mask,
                  keys.IDS_RESTORE: restore, keys.RECONSTRUCTION_TARGET: patches}
        return mixed.reshape(x.shape), batch.evolve(extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        b = max(self.group_size, batch_size - batch_size % self.group_size)
        return (torch.randn(b, *self.image_shape, generator=generator),
                Batch(index=torch.arange(b)))


class HomologousMixingRecognition(Objective):
    """The encoder's tokens of every mixed input ``Views.extras[keys.FEATURES]`` ``[B, 1 + L,
    embed_dim]`` (class token first, all ``L`` patches: the ``homologous_mixing_recognition``
    transform mixes, ``vit`` encodes) and that transform's ``Batch.extras``. Loss per sample:
    the reconstruction of the sample's own image from its own ``L / group_size`` tokens (this
    objective's :class:`sdk.transformer.MaskedDecoder`, mask tokens at the other images'
    positions; squared error on those positions, MAE's per-patch normalised target when
    ``norm_pix_loss``) ``+ hc_weight *`` :func:`homologous_contrastive` over the mixed input's
    patch tokens with the sources as classes."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET, keys.MIXING_SOURCE)}
    batch_coupled = False

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, group_size: Annotated[int, Ge(2)] = 4,
                 embed_dim: Annotated[int, Ge(1)] = 64,
                 temperature: Annotated[float, Gt(0)] = 0.05,
                 hc_weight: Annotated[float, Ge(0)] = 1.0,
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 2,
                 decoder_heads: Annotated[int, Ge(1)] = 4,
                 mlp_ratio: Annotated[float, Interval(gt=0)] = 4.0, norm_pix_loss: bool = True):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        grid, self.num_patches = _layout(NAME, self.image_shape, patch_size, group_size)
        _, _, self.patch_dim = reconstruction_layout(NAME, self.image_shape, patch_size, norm_pix_loss)
        self.group_size, self.embed_dim, self.temperature = group_size, embed_dim, temperature
        self.patch_size, self.hc_weight, self.norm_pix_loss = patch_size, hc_weight, norm_pix_loss
        self.decoder = MaskedDecoder(embed_dim, self.patch_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads, mlp_ratio=mlp_ratio)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {NAME!r}"
        tokens = views.extras[keys.FEATURES]
        tokens = tokens[0] if isinstance(tokens, (tuple, list)) else tokens
        n = self.num_patches
        if (not isinstance(tokens, Tensor) or not tokens.is_floating_point() or tokens.dim() != 3
                or tokens.shape[1:] != (1 + n, self.embed_dim)):
            got = (f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, Tensor)
                   else type(tokens).__name__)
            raise ShapeError(f"{owner}: Views.extras['features'] must be the encoder's tokens of the "
                             f"whole mixed input, floating [B, {1 + n}, {self.embed_dim}] (class "
                             f"token and all {n} patches), got {got}")
        b = tokens.shape[0]
        ids_restore, mask = batch.extras[keys.IDS_RESTORE], batch.extras[keys.MASK]
        check_mask(owner, ids_restore, mask, n)
        sources, target = batch.extras[keys.MIXING_SOURCE], batch.extras[keys.RECONSTRUCTION_TARGET]
        if not isinstance(sources, Tensor) or sources.is_floating_point() or sources.shape != (b, n):
            raise ShapeError(f"{owner}: Batch.extras[{keys.MIXING_SOURCE!r}] must be integer "
                             f"[{b}, {n}], got {getattr(sources, 'dtype', type(sources).__name__)} "
                             f"{list(getattr(sources, 'shape', []))}")
        if (not isinstance(target, Tensor) or target.shape != (b, n, self.patch_dim)
                or ids_restore.shape[0] != b):
            raise ShapeError(f"{owner}: Batch.extras[{keys.RECONSTRUCTION_TARGET!r}] must be the own "
                             f"patches [{b}, {n}, {self.patch_dim}] and the mask of {b} rows, got "
                             f"{list(getattr(target, 'shape', []))} and {list(ids_restore.shape)}")
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        own = torch.argsort(ids_restore, dim=1)[:, :n // self.group_size]
        visible = torch.cat([tokens[:, :1], gather_tokens(tokens[:, 1:], own)], dim=1)
        prediction = self.decoder(visible, ids_restore)
        goal = normalized_patches(target.float()) if self.norm_pix_loss else target
        _, reconstruction = masked_mse(prediction, goal, mask)
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        hc = homologous_contrastive(tokens[:, 1:].to(dtype), sources.to(tokens.device), self.temperature)
        per_sample = reconstruction.to(dtype) + self.hc_weight * hc
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"reconstruction": reconstruction.mean().detach(),
                          "homologous_contrastive": hc.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        b = max(self.group_size, batch_size - batch_size % self.group_size)
        transform = HomologousMixing(self.image_shape, self.patch_size, self.group_size)
        images = torch.rand(b, *self.image_shape, generator=generator)
        _, batch = transform(images, Batch(index=torch.arange(b)))
        tokens = torch.randn(b, 1 + self.num_patches, self.embed_dim, generator=generator).requires_grad_()
        return (Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)}), batch)


TRANSFORM_CARD = Card(
    name=NAME, kind="transform",
    title="Mixed Autoencoder for Self-supervised Visual Representation Learning (MixedAE)",
    paper="arXiv:2303.17152",
    summary="Patch-wise mixing of groups of images: every sample's input holds a 1/group_size "
            "share of its own patches and equal shares of the other members', each patch of "
            "every image used once; passes the sources, the own-patch mask and the own patches on.",
    formula="o_l uniform over offsets, each on L/n positions; source(j, l) = (j + o_l) mod n; "
            "x_mix_j[l] = x_source(j, l)[l]; mask_jl = [source(j, l) != j]",
    left_out="Mixing ratio 0.25 (4 images per group), as the paper. The paper's exact sampling of "
             "the mixing masks is not reproduced beyond the ratio: here the group's mixed inputs "
             "share one offset map so every patch of every image is used once. The segment "
             "embeddings (which image a patch came from, added before the encoder) belong to "
             "the encoder and are not here.",
)

CARD = Card(
    name=NAME, kind="objective",
    title="Mixed Autoencoder for Self-supervised Visual Representation Learning (MixedAE)",
    paper="arXiv:2303.17152",
    summary="Reconstruct each image from its own patches in the mixed input, and make every patch "
            "token recognise its homologous patches (same source image) among the mixed input's "
            "patches with a supervised contrastive loss.",
    formula="x_hat = dec(restore(own tokens, mask tokens)); L_rec = sum_l m_l ||x_hat_l - t_l||^2 / "
            "P / sum m (t: normalised patches); L_HC = mean_l -(1/|P_l|) sum_{p in P_l} "
            "log(exp(cos(z_l, z_p)/0.05) / sum_{k != l} exp(cos(z_l, z_k)/0.05)); "
            "L = L_rec + 1.0 L_HC",
    left_out="The ViT-B backbone, its homologous attention (each query attends to its TopK "
             "patches) and segment embeddings are encoder changes not made here; any token "
             "encoder that sees the whole mixed input serves. The contrastive term acts on the "
             "encoder's patch tokens directly (no projection head), with SupCon's form; its "
             "temperature 0.05 and weight 1.0 follow a public re-implementation "
             "(Natyren/MixedAE) and were not checked against the paper's appendix. The decoder "
             "is the tiny one of `mae` (width 32, 2 blocks) for 8x8 digits; norm_pix_loss "
             "defaults to True as `mae` here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(HomologousMixing, card=TRANSFORM_CARD)
    registry.add(HomologousMixingRecognition, card=CARD)
