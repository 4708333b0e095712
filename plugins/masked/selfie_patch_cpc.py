"""Selfie: pick, for every hidden location, its own patch among the image's hidden patches.

Trinh, Luong and Le, "Selfie: Self-supervised Pretraining for Image Embedding", 2019
(arXiv:1906.02940).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.masking import check_mask, example_masked_inputs, gather_tokens, hidden_ids, image_grid
from sdk.transformer import check_tokens
from sdk.types import Batch, Loss, Views


def selfie_loss(u: Tensor, location: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
    """``(per_sample [B], accuracy [B])``: with the summary ``u [B, D]`` of the visible patches,
    the queries ``v_j = u + location_j`` (``location [B, M, D]``, the embedding of hidden location
    ``j``) and the hidden patches' encodings ``candidates [B, M, D]`` (row ``j`` the patch of
    location ``j``), ``-(1/M) sum_j log softmax_k(v_j . h_k)[j]``: each location's patch against the
    other hidden patches of the same image. In float32."""
    v = u.float()[:, None] + location.float()
    logits = v @ candidates.float().transpose(1, 2)  # [B, M, M]: query j, candidate k
    target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return nll.mean(1), (logits.argmax(2) == target).float().mean(1)


class SelfiePatchCPC(Objective):
    """Selfie's objective. The encoder is a token encoder over the *visible* patches (``vit`` fed
    by ``patch_masking``; Selfie's attention pooling network ``A`` with its query ``u_0`` is the
    encoder's transformer and class token), so ``u`` is the class token of
    ``Views.extras[keys.FEATURES]`` ``[B, 1 + K, embed_dim]``. The hidden patches' pixels
    (``Batch.extras`` :data:`~sdk.keys.RECONSTRUCTION_TARGET` at the ids :data:`~sdk.keys.MASK` /
    :data:`~sdk.keys.IDS_RESTORE` mark hidden) are encoded one by one, without context or
    position, by this objective's patch network ``P`` (an MLP ``P -> patch_hidden -> embed_dim``);
    every patch location has a learned embedding. Loss: :func:`selfie_loss` averaged over the
    batch (each image needs at least two hidden patches); ``logs['accuracy']`` is the share of
    locations whose own patch scores highest."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 patch_size: Annotated[int, Ge(1)] = 2, embed_dim: Annotated[int, Ge(1)] = 64,
                 patch_hidden: Annotated[int, Ge(1)] = 64):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        grid = image_grid("selfie_patch_cpc", self.image_shape, patch_size)
        self.num_patches = grid[0] * grid[1]
        self.patch_dim = patch_size * patch_size * self.image_shape[0]
        self.embed_dim = embed_dim
        self.patch_net = nn.Sequential(nn.Linear(self.patch_dim, patch_hidden), nn.GELU(),
                                       nn.Linear(patch_hidden, embed_dim))
        self.location = nn.Parameter(torch.zeros(self.num_patches, embed_dim))
        nn.init.trunc_normal_(self.location, std=0.02)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'selfie_patch_cpc'"
        tokens = check_tokens(owner, views.extras[keys.FEATURES], self.embed_dim, self.num_patches)
        ids_restore, mask = batch.extras[keys.IDS_RESTORE], batch.extras[keys.MASK]
        patches = batch.extras[keys.RECONSTRUCTION_TARGET]
        check_mask(owner, ids_restore, mask, self.num_patches)
        b, n_visible = tokens.shape[0], tokens.shape[1] - 1
        if patches.shape != (b, self.num_patches, self.patch_dim) or ids_restore.shape[0] != b:
            raise ShapeError(f"{owner}: Batch.extras[{keys.RECONSTRUCTION_TARGET!r}] must be the "
                             f"patches [{b}, {self.num_patches}, {self.patch_dim}] and the mask of "
                             f"{b} rows, got {list(patches.shape)} and {list(ids_restore.shape)}")
        if self.num_patches - n_visible < 2:
            raise ShapeError(f"{owner}: {self.num_patches - n_visible} hidden patch per image; the "
                             "loss picks each among the others, so at least 2 must be hidden")
        hidden = hidden_ids(ids_restore, n_visible)
        dtype = self.location.dtype
        cand = self.patch_net(gather_tokens(patches.to(dtype), hidden))
        location = self.location[hidden]
        per_sample, accuracy = selfie_loss(tokens[:, 0], location, cand)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"accuracy": accuracy.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        return example_masked_inputs(batch_size, self.num_patches, 0.25, self.embed_dim, self.patch_dim,
                                     generator=generator)


CARD = Card(
    name="selfie_patch_cpc", kind="objective",
    title="Selfie: Self-supervised Pretraining for Image Embedding",
    paper="arXiv:1906.02940",
    summary="Summarise the visible patches into u (a token encoder's class token); for every "
            "hidden location, classify its own patch among the image's hidden patches by the dot "
            "product of u + location embedding with each patch's encoding (CPC-style).",
    formula="u = enc(x_visible)[cls]; h_k = P(x_k), k hidden; v_j = u + pos_j; "
            "L = -(1/M) sum_{j hidden} log softmax_{k hidden}(v_j . h_k)[j]",
    left_out="Masking is the patch_masking transform's (the paper hides a fixed number of patches "
             "per image; mask_ratio=0.25 there hides 4 of the 16 2x2 patches of an 8x8 digit). "
             "The paper shares one patch network (ResNet-50's first blocks) between the visible "
             "patches and the candidates and fine-tunes it; here the encoder (vit: patch "
             "embedding plus transformer = Selfie's attention pooling) sees the visible patches "
             "and the candidates go through this objective's own MLP, discarded after "
             "pre-training. Row/column location embeddings for large grids, ImageNet "
             "experiments and the fine-tuning recipe are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SelfiePatchCPC, card=CARD)
