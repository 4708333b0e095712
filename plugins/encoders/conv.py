"""A small convolutional encoder for image tensors.

LeCun et al., "Gradient-Based Learning Applied to Document Recognition", Proc. IEEE 1998 (the
convolution / pooling stack), with batch norm (Ioffe & Szegedy, 2015) and global average pooling.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn

from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.masking import as_image


class Conv(Encoder):
    """Images ``[B, C, H, W]`` (or flat ``[B, C*H*W]``, reshaped to ``image_shape``) -> per entry of
    ``channels``: 3x3 convolution, BatchNorm, ReLU (a 2x2 max-pool after every block but the
    last) -> global average pool (:meth:`features`, ``[B, channels[-1]]``) -> linear ``out_dim``."""

    def __init__(self, in_dim: Annotated[int | None, FromData("in_dim")] = None,
                 image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 channels: tuple[int, ...] | list[int] = (32, 64),
                 out_dim: Annotated[int, Ge(1)] = 64):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1 or not channels:
            raise ConfigError(f"conv: image_shape must be (C, H, W) and channels non-empty, got "
                              f"{self.image_shape}, {tuple(channels)}", param="image_shape")
        c, h, w = self.image_shape
        if in_dim is not None and in_dim != c * h * w:
            raise ConfigError(f"conv: in_dim={in_dim} is not the image_shape's {c}x{h}x{w} = "
                              f"{c * h * w} values", param="in_dim")
        self.in_dim, self.out_dim = c * h * w, out_dim
        layers: list[nn.Module] = []
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        if not x.is_floating_point():
            raise ShapeError(f"encoder 'conv': x must be floating images [B, {c}, {h}, {w}], got "
                             f"{x.dtype} {list(x.shape)}")
        x = as_image("encoder 'conv'", x, self.image_shape)
        if self.training and x.shape[0] < 2:
            raise ShapeError("encoder 'conv': x has 1 row, but batch norm in training mode needs "
                             "a batch of at least 2")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


CARD = Card(
    name="conv", kind="encoder", title="Gradient-Based Learning Applied to Document Recognition",
    paper="https://doi.org/10.1109/5.726791",
    summary="Small CNN for image tensors: 3x3 conv-BN-ReLU blocks with max-pooling, global "
            "average pool, linear output.",
    formula="h = GAP(block_n(...pool(block_1(x)))); block = ReLU(BN(conv3x3(.))); z = W h + b",
    left_out="Not LeNet-5's exact layers (5x5 convolutions, tanh, subsampling, RBF outputs): a "
             "modern small stack with batch norm and global average pooling, sized for 8x8 digits.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Conv, card=CARD)
