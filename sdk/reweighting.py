"""What the batch-coupled reweighters share: weights that are a softmax over the whole global
batch (KL-regularised DRO weights, loss-based sample reweighting).

Under DDP the engine averages the ranks' gradients, so for the ranks together to equal one
process on the concatenated batch a rank's reduced loss must be ``world * sum_{i in rank}
w_i l_i`` with ``w`` normalised over the global batch: :func:`global_softmax` returns that
rank's slice of the global softmax times the world size, and the reweighter declares
``normalize = False``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdk import distributed
from sdk.errors import ShapeError


def global_softmax(scores: Tensor) -> Tensor:
    """``softmax`` of ``scores`` ``[B]`` over the batches of every rank (concatenated in rank
    order; every rank must pass the same ``B``), this rank's rows, times the world size;
    ``softmax(scores)`` in one process. No gradient."""
    scores = scores.detach()
    if not distributed.is_distributed() or distributed.world_size() == 1:
        return torch.softmax(scores, dim=0)
    world, b = distributed.world_size(), scores.shape[0]
    rank = distributed.rank()
    w = torch.softmax(distributed.gather_no_grad(scores), dim=0)
    return world * w[rank * b:(rank + 1) * b]


def gathered(x: Tensor) -> Tensor:
    """``x`` ``[B]`` of every rank concatenated (no gradient); ``x`` in one process."""
    return distributed.gather_no_grad(x.detach())


def check_rows(owner: str, per_sample: Tensor, batch: Any) -> None:
    """Raise :class:`sdk.ShapeError` naming ``owner`` unless ``per_sample`` is ``[B]`` and every
    per-sample field of ``batch`` has ``B`` rows (metadata only)."""
    if per_sample.dim() != 1:
        raise ShapeError(f"{owner}: per-sample losses must be [B], got {list(per_sample.shape)}")
    rows = batch.batch_size
    if rows is not None and rows != per_sample.shape[0]:
        field = next(f for f in ("targets", "index", "domain", "weight") if getattr(batch, f) is not None)
        raise ShapeError(f"{owner}: Batch.{field} has {rows} rows, but there are "
                         f"{per_sample.shape[0]} per-sample losses")
