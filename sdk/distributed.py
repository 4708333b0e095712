"""torchrun / DistributedDataParallel helpers: rank info and gathers that keep gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and keeps this rank's slice.

    With each rank's loss a mean over its local anchors and DDP averaging parameter
    gradients, this reproduces the single-process gradient of the global-batch loss.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.batch
        return grad[start:start + ctx.batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] from every rank (rank order) with gradient; identity when alone.

    All ranks must pass the same batch size.
    """
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank without gradient (labels, indices)."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
