"""Test-time adaptation: what the adapters of ``plugins/uncertainty/`` share.

An adapter (:class:`sdk.interfaces.Adapter`) changes a model on unlabeled test batches; the
methods here act on its batch-normalisation layers: :func:`batch_norm_layers` finds them (and
refuses a model without any), :func:`softmax_entropy` is the per-sample prediction entropy
that entropy-minimising adapters descend, :func:`batch_moments` the per-channel moments a BN
layer's input has over the batch (and spatial positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdk.errors import ConfigError, ShapeError

__all__ = ["batch_norm_layers", "softmax_entropy", "batch_moments"]


def batch_norm_layers(model: nn.Module, owner: str, *, running_stats: bool = False) -> list[nn.Module]:
    """The model's ``BatchNorm1d/2d/3d`` layers in module order; ``running_stats``: each must
    keep running statistics. A model without any raises :class:`sdk.ConfigError`."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ConfigError(f"{owner}: the model has no BatchNorm layer to adapt", param="model")
    if running_stats and any(m.running_mean is None for m in layers):
        raise ConfigError(f"{owner}: every BatchNorm layer must track running statistics "
                          "(track_running_stats=True)", param="model")
    return layers


def batch_moments(h: Tensor, owner: str) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (float32 or float64) of a BN layer's input
    ``[B, C, ...]`` over the batch and every spatial position."""
    if h.dim() < 2:
        raise ShapeError(f"{owner}: a BatchNorm layer's input must be [B, C, ...], got {list(h.shape)}")
    dims = [0, *range(2, h.dim())]
    h = h if h.dtype in (torch.float32, torch.float64) else h.float()
    return h.mean(dims), h.var(dims, unbiased=False)


def softmax_entropy(logits: Tensor) -> Tensor:
    """``H(p) = -sum_c p_c log p_c`` per row, ``p = softmax(z)``, in float32 at least."""
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)
