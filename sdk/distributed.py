"""torchrun / DistributedDataParallel helpers: rank info and gathers that keep gradients."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from sdk.errors import ConfigError

Gather = bool | Literal["auto"]
"""The ``gather`` parameter of batch-coupled objectives: ``"auto"`` (the default) gathers
across ranks whenever the world size is > 1; ``True`` / ``False`` force it on / off."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def resolve_gather(gather: Gather) -> bool:
    """Whether an objective with this ``gather`` setting gathers now: ``"auto"`` and ``True``
    when the world size is > 1 (alone there is nothing to gather), ``False`` never."""
    if gather is not True and gather is not False and gather != "auto":
        raise ConfigError(f"gather must be True, False or 'auto', got {gather!r}", param="gather")
    return gather is not False and world_size() > 1


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


# process-group set-up ------------------------------------------------------------------------


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """``LOCAL_RANK`` as set by torchrun (0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (``env://``); no-op for a single process.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise. Returns whether the
    process is part of a multi-process group. Under torchrun's elastic agent the group's keys
    are prefixed by the restart count (``TORCHELASTIC_RESTART_COUNT``): the agent keeps one
    store across restarts, and without the prefix a restarted rank could read the address a
    killed rank published and fail to connect.
    """
    if is_distributed():
        return world_size() > 1
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend)
        return True
    store, rank_, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{attempt}/", store),
                            rank=rank_, world_size=world)
    return True


def is_main() -> bool:
    """Whether this is rank 0 (the process that logs and writes checkpoints)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when alone."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(x: Tensor) -> Tensor:
    """Rank 0's ``x`` on every rank (in place; ``x`` itself when alone), e.g. a random draw
    that every rank must share."""
    if is_distributed() and world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def sum_over_ranks(x: Tensor) -> Tensor:
    """``x`` summed over the ranks (a new tensor, no gradient); ``x`` itself when alone."""
    if not is_distributed() or world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average ``tensors`` in place over the ranks (gradients of parameters outside DDP)."""
    if not is_distributed() or world_size() == 1 or not tensors:
        return
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world_size())
