"""High-frequency perceptual loss: the squared error between the high-frequency bands of an image
and of its reference, taken from an invertible multi-level Haar decomposition.

Sami, Hasan, Dawson and Nasrabadi, "HF-Diff: High-Frequency Perceptual Loss and Distribution
Matching for One-Step Diffusion-Based Image Super-Resolution", 2024 (arXiv:2411.13548). Their
features come from the pretrained invertible network of Xiao et al., "Invertible Image
Rescaling" (ECCV 2020), whose downscaling modules each start with this Haar transform.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.imaging import image_pair
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def haar_step(x: Tensor) -> tuple[Tensor, Tensor]:
    """One orthonormal 2-D Haar step of ``x [N, C, H, W]`` (``H``, ``W`` even): ``(low, high)``
    with ``low = (a + b + c + d) / 2`` ``[N, C, H/2, W/2]`` and the three detail bands
    ``((a - b + c - d), (a + b - c - d), (a - b - c + d)) / 2`` stacked as ``[N, C, 3, H/2, W/2]``,
    where ``a, b / c, d`` are the top and bottom rows of each 2x2 block."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    low = (a + b + c + d) / 2
    high = torch.stack([a - b + c - d, a + b - c - d, a - b - c + d], dim=2) / 2
    return low, high


def high_frequency_bands(x: Tensor, levels: int) -> tuple[list[Tensor], Tensor]:
    """``([high_1, ..., high_L], low_L)``: ``levels`` Haar steps, each on the previous low band.
    The transform is orthonormal, so ``|x|^2 = |low_L|^2 + sum_j |high_j|^2``."""
    highs = []
    for _ in range(levels):
        x, high = haar_step(x)
        highs.append(high)
    return highs, x


def high_frequency_perceptual(pred: Tensor, target: Tensor, levels: int = 2) -> Tensor:
    """``[B]``: ``sum_{j=1..L} mean((H_j(x̂) - H_j(x))^2)`` over each image's level-``j`` detail
    bands (all channels), computed in float32 (float64 kept). ``H`` and ``W`` must be multiples
    of ``2^levels``."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    diff = pred.to(dtype) - target.to(dtype)  # the transform is linear: bands of the difference
    highs, _ = high_frequency_bands(diff, levels)
    return torch.stack([h.pow(2).flatten(1).mean(1) for h in highs]).sum(0)


class HighFrequencyPerceptual(Objective):
    """``L = mean_b sum_j mean((H_j(x̂_b) - H_j(x_b))^2)``: the detail bands ``H_j`` of ``levels``
    orthonormal Haar steps (:func:`haar_step`), so the loss ignores whatever the two images
    share below the coarsest scale (an offset constant on ``2^L x 2^L`` blocks costs nothing) and
    scores the fine detail a super-resolved image lacks. The prediction ``x̂`` is
    ``Views.embeddings[0]`` (a decoder's image as a row, ``[B, C·H·W]``), the reference ``x`` is
    ``Batch.extras[keys.INPUT]`` (``[B, C, H, W]``, or flat rows with ``image_shape = (C, H,
    W)``). Computed in float32."""

    requires = {"views": 1, "extras": (keys.INPUT,)}
    batch_coupled = False

    def __init__(self, levels: Annotated[int, Ge(1)] = 2,
                 image_shape: tuple[Annotated[int, Ge(1)], ...] | None = None):
        super().__init__()
        if image_shape is not None and len(image_shape) != 3:
            raise ConfigError(f"high_frequency_perceptual: image_shape must be (C, H, W), got "
                              f"{image_shape}", param="image_shape")
        self.levels = levels
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def _images(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        owner = "objective 'high_frequency_perceptual'"
        pred, target = image_pair(owner, pred, target, self.image_shape)
        shape = target.shape[1:]
        side = 2 ** self.levels
        if shape[1] % side or shape[2] % side:
            raise ShapeError(f"{owner}: images of {shape[1]}x{shape[2]} do not split into "
                             f"{self.levels} Haar level(s): H and W must be multiples of {side}")
        return pred, target

    def forward(self, views: Views, batch: Batch) -> Loss:
        pred, target = self._images(views.embeddings[0], batch.extras[keys.INPUT])
        per_sample = high_frequency_perceptual(pred, target, self.levels)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        shape = self.image_shape or (1, 8, 8)
        target = torch.rand(batch_size, *shape, generator=generator)
        pred = target + 0.1 * torch.randn(batch_size, *shape, generator=generator)
        return (Views(embeddings=(pred.flatten(1).requires_grad_(),)),
                Batch(index=torch.arange(batch_size), extras={keys.INPUT: target}))


CARD = Card(
    name="high_frequency_perceptual", kind="objective",
    title="HF-Diff: High-Frequency Perceptual Loss and Distribution Matching for One-Step "
          "Diffusion-Based Image Super-Resolution (high-frequency loss)",
    paper="arXiv:2411.13548",
    summary="Train a super-resolution or restoration network to reproduce the reference image's "
            "high-frequency detail: the squared error between the detail bands of an invertible "
            "multi-level Haar decomposition of the output and of the reference.",
    formula="Haar step of 2x2 blocks (a b; c d): low = (a+b+c+d)/2, high = ((a-b+c-d), (a+b-c-d), "
            "(a-b-c+d))/2; H_j = high bands of level j (each level on the previous low band); "
            "L = mean_b sum_{j=1..L} mean((H_j(x̂) - H_j(x))^2), L = 2 levels",
    left_out="The pretrained invertible network whose feature maps the paper compares (its "
             "coupling blocks, trained on ImageNet) is not here: this loss keeps only the fixed "
             "Haar transform that opens each of its downscaling modules (two for its x4 model, "
             "hence levels = 2), so it compares wavelet detail bands rather than learned "
             "features. The DINOv2 Jensen-Shannon distribution matching and the one-step "
             "diffusion SR model (SinSR) are left out.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(HighFrequencyPerceptual, card=CARD)
