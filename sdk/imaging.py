"""What the image-quality objectives share: their predicted images and the reference images
read from one batch, checked against each other (``ms_ssim_loss``, ``high_frequency_perceptual``)."""

from __future__ import annotations

import torch
from torch import Tensor

from sdk import keys
from sdk.errors import ShapeError


def image_pair(owner: str, pred: Tensor, target: object,
               image_shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """``pred`` (``Views.embeddings[0]``: one image per row, flat or not) and ``target``
    (``Batch.extras[keys.INPUT]``: images ``[B, C, H, W]``, or flat rows of ``image_shape``) as
    two ``[B, C, H, W]`` tensors (views of the inputs), or :class:`sdk.ShapeError` naming
    ``owner`` and the field at fault. Metadata only."""
    where = f"Batch.extras[{keys.INPUT!r}]"
    if not isinstance(target, Tensor) or not target.is_floating_point():
        raise ShapeError(f"{owner}: {where} must be a floating image tensor, got "
                         f"{getattr(target, 'dtype', type(target).__name__)}")
    if image_shape is not None:
        shape = tuple(image_shape)
        if target.dim() < 1 or target[0].numel() != torch.Size(shape).numel():
            raise ShapeError(f"{owner}: {where} {list(target.shape)} does not hold images of "
                             f"image_shape {list(shape)}")
    elif target.dim() != 4:
        raise ShapeError(f"{owner}: {where} must be images [B, C, H, W] (or give image_shape for "
                         f"flat rows), got {list(target.shape)}")
    else:
        shape = tuple(target.shape[1:])
    if pred.shape[0] != target.shape[0] or pred[0].numel() != torch.Size(shape).numel():
        raise ShapeError(f"{owner}: Views.embeddings[0] {list(pred.shape)} must hold one image "
                         f"{list(shape)} per row of the {target.shape[0]} reference images")
    return pred.reshape(-1, *shape), target.reshape(-1, *shape)
