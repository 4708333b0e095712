"""Hide most patches of every sample: the masking step of masked image / sequence modelling.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (per-sample random
masking); Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022 (block-wise).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Transform
from sdk.masking import as_image, block_mask, image_grid, patchify, patchify_sequence, random_mask, visible
from sdk.types import Batch

STRATEGIES = ("random", "block")


class PatchMasking(Transform):
    """``(x, batch) -> (visible(x, ids_keep), batch + mask)``.

    ``x``: images ``[B, C, H, W]`` or flat ``[B, C*H*W]`` of ``image_shape`` (patches of
    ``patch_size x patch_size`` pixels), or, with ``sequence_shape = (T, D)``, sequences
    ``[B, T, D]`` (or flat) in runs of ``patch_size`` steps. Each sample hides
    ``round(L * mask_ratio)`` of its ``L`` patches (``strategy``: uniformly, MAE's, or in
    rectangles of patches, BEiT's block-wise masking; images only). The input comes back marked
    with the visible patches' ids (:class:`sdk.masking.Visible`: a token encoder such as ``vit``
    then encodes those only) and ``Batch.extras`` gains :data:`sdk.keys.MASK` ``[B, L]`` (1 =
    hidden), :data:`sdk.keys.IDS_RESTORE` ``[B, L]`` and :data:`sdk.keys.RECONSTRUCTION_TARGET`,
    the raw patches ``[B, L, P]``."""

    def __init__(self, image_shape: tuple[int, int, int] | list[int] | None = (1, 8, 8),
                 sequence_shape: tuple[int, int] | list[int] | None = None,
                 patch_size: Annotated[int, Ge(1)] = 2,
                 mask_ratio: Annotated[float, Interval(ge=0, lt=1)] = 0.75,
                 strategy: Annotated[str, one_of(STRATEGIES)] = "random"):
        super().__init__()
        if sequence_shape is not None:
            if len(sequence_shape) != 2 or sequence_shape[0] % patch_size:
                raise ConfigError(f"patch_masking: sequence_shape must be (T, D) with T a multiple "
                                  f"of patch_size={patch_size}, got {tuple(sequence_shape)}",
                                  param="sequence_shape")
            if strategy == "block":
                raise ConfigError("patch_masking: strategy='block' masks rectangles of an image's "
                                  "patches; sequences take strategy='random'", param="strategy")
            self.sequence_shape: tuple[int, ...] | None = tuple(int(s) for s in sequence_shape)
            self.image_shape: tuple[int, ...] | None = None
            self.grid: tuple[int, ...] = (self.sequence_shape[0] // patch_size,)
        elif image_shape is None:
            raise ConfigError("patch_masking: give image_shape (C, H, W) or sequence_shape (T, D)",
                              param="image_shape")
        else:
            self.image_shape, self.sequence_shape = tuple(int(s) for s in image_shape), None
            self.grid = image_grid("patch_masking", self.image_shape, patch_size)
        self.patch_size, self.mask_ratio, self.strategy = patch_size, mask_ratio, strategy

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_shape is not None:
            return patchify(as_image("transform 'patch_masking'", x, self.image_shape), self.patch_size)
        t, d = self.sequence_shape
        if x.dim() == 2 and x.shape[1] == t * d:
            x = x.reshape(x.shape[0], t, d)
        if x.dim() != 3 or tuple(x.shape[1:]) != (t, d):
            raise ShapeError(f"transform 'patch_masking': x must be sequences [B, {t}, {d}] or flat "
                             f"[B, {t * d}], got {list(x.shape)}")
        return patchify_sequence(x, self.patch_size)

    def forward(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Batch]:
        target = self.patches(x)
        b, length = target.shape[:2]
        if self.strategy == "block":
            mask = block_mask(b, self.grid, self.mask_ratio, device=x.device)
        else:
            mask = random_mask(b, length, self.mask_ratio, device=x.device)
        extras = {**batch.extras, keys.MASK: mask.mask, keys.IDS_RESTORE: mask.ids_restore,
                  keys.RECONSTRUCTION_TARGET: target}
        return visible(x, mask.ids_keep), batch.evolve(extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        shape = self.image_shape or self.sequence_shape
        return (torch.randn(batch_size, *shape, generator=generator),
                Batch(index=torch.arange(batch_size)))


CARD = Card(
    name="patch_masking", kind="transform", title="Masked Autoencoders Are Scalable Vision Learners",
    paper="arXiv:2111.06377",
    summary="Per-sample masking of image or sequence patches (random as MAE, or block-wise as "
            "BEiT); marks the visible patches for a token encoder and passes mask and targets on.",
    formula="noise ~ U(0,1)^{B x L}; ids_shuffle = argsort(noise); keep ids_shuffle[:, :K], "
            "K = L - round(r L); ids_restore = argsort(ids_shuffle); mask = [ids_restore >= K]",
    left_out="Block-wise masking draws 4 rectangles (sides 0.2-0.6 of the grid's) in parallel "
             "and ranks patches by coverage to mask exactly round(r L) (BEiT adds blocks one at "
             "a time, with aspect "
             "ratios in [0.3, 1/0.3], until about that many are covered). MAE's crop and flip "
             "augmentation is not part of the mask.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PatchMasking, card=CARD)
