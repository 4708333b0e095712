"""Per-sample training statistics keyed by ``Batch.index``: the running (EMA) loss, the last
loss, the confidence in the labelled class, the logit margin, whether the sample was last
classified correctly, how often it was seen and its forgetting events (Toneva et al. 2019: a
sample learnt at one presentation and misclassified at the next).

:class:`SampleStats` is an ``nn.Module`` whose statistics are buffers of one entry per dataset
row, so a component holding one (a reweighter, a callback that is a module) checkpoints them
with its own state and a killed run resumes them bit for bit. Under DDP each rank passes its
own micro-batch; :meth:`SampleStats.update` all-gathers the indices and values of every rank and
writes them by index, so every rank holds the same statistics as one process that saw the whole
global batch (the entries' order over the ranks never matters, only their indices). Updates are
vectorised and free of host syncs: a row that occurs more than once in one (global) update takes
the value of its last occurrence, in rank order.
"""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor, nn

from sdk import distributed
from sdk.constraints import Constrained
from sdk.errors import RequirementError, ShapeError


def last_position(index: Tensor, size: int) -> Tensor:
    """Long ``[B]``: for each position ``i``, the last position holding ``index[i]``. Reading
    every value through it makes the duplicates of a row carry one value (its last
    occurrence's), so writing them all by index is deterministic without compacting the batch
    (which would cost a host sync)."""
    position = torch.arange(index.shape[0], device=index.device)
    last = torch.full((size,), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, index, position, reduce="amax")
    return last[index]


def confidence_and_margin(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: the softmax probability of the labelled class, the logit margin
    ``z_y - max_{k != y} z_k`` (Pleiss et al.'s margin) and whether the prediction is correct
    (``margin > 0``, ties counting as wrong), all from float32 logits."""
    z = logits.detach().float()
    own = z.gather(1, targets[:, None]).squeeze(1)
    others = z.scatter(1, targets[:, None], float("-inf")).amax(1)
    margin = own - others
    return torch.softmax(z, 1).gather(1, targets[:, None]).squeeze(1), margin, margin > 0


class SampleStats(nn.Module, Constrained):
    """Statistics of ``num_samples`` dataset rows (buffers ``[N]``):

    * ``seen``: how many updates included the row;
    * ``loss``: the last loss, ``loss_ema``: ``m * loss_ema + (1 - m) * loss`` (the first loss
      on the first presentation), ``m = momentum``;
    * ``confidence`` (``p_y``), ``margin`` (``z_y - max_{k != y} z_k``), ``correct`` (the last
      presentation's prediction was right) and ``forgetting`` (presentations at which a row
      that was right at its previous presentation is wrong), when logits and class targets are
      given; confidence and margin are 0 and correct False for rows never given logits.

    ``update`` works in training and evaluation mode alike (the caller decides when to record).
    """

    def __init__(self, num_samples: Annotated[int, annotated_types.Ge(1)],
                 momentum: Annotated[float, annotated_types.Interval(ge=0, lt=1)] = 0.9):
        super().__init__()
        self.num_samples, self.momentum = num_samples, momentum
        n = num_samples
        self.register_buffer("seen", torch.zeros(n, dtype=torch.long))
        self.register_buffer("loss", torch.zeros(n))
        self.register_buffer("loss_ema", torch.zeros(n))
        self.register_buffer("confidence", torch.zeros(n))
        self.register_buffer("margin", torch.zeros(n))
        self.register_buffer("correct", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("forgetting", torch.zeros(n, dtype=torch.long))

    def check_index(self, owner: str, index: Tensor | None, rows: int) -> Tensor:
        """``index`` checked to be integer ``[rows]`` (metadata only: values are not read)."""
        if index is None:
            raise RequirementError(f"{owner} needs Batch.index (dataset row ids) for its per-sample "
                                   "statistics, got None")
        if index.shape != (rows,) or index.is_floating_point() or index.dtype == torch.bool:
            raise ShapeError(f"{owner}: Batch.index must be integer row ids [{rows}], got "
                             f"{index.dtype} {list(index.shape)}")
        return index

    @torch.no_grad()
    def update(self, index: Tensor, loss: Tensor, logits: Tensor | None = None,
               targets: Tensor | None = None) -> None:
        """Record one (micro-)batch: ``index`` ``[B]``, per-sample ``loss`` ``[B]`` and optionally
        ``logits`` ``[B, C]`` with class ids ``targets`` ``[B]``. Under DDP every rank must call it
        with the same batch size (a collective)."""
        self.check_index("SampleStats.update", index, loss.shape[0])
        if logits is not None:
            if targets is None:
                raise RequirementError("SampleStats.update: logits given without class targets")
            if logits.dim() != 2 or logits.shape[0] != loss.shape[0] or targets.shape != loss.shape:
                raise ShapeError(f"SampleStats.update: logits {list(logits.shape)} and targets "
                                 f"{list(targets.shape)} must be [B, C] and [B] for B = {loss.shape[0]}")
        device = self.seen.device
        index = distributed.gather_no_grad(index.to(device))
        loss = distributed.gather_no_grad(loss.detach().float().to(device))
        src = last_position(index, self.num_samples)
        rows, value = index, loss[src]
        first = self.seen[rows] == 0
        ema = torch.where(first, value, self.momentum * self.loss_ema[rows] + (1 - self.momentum) * value)
        self.loss_ema.index_copy_(0, rows, ema)
        self.loss.index_copy_(0, rows, value)
        if logits is not None:
            conf, margin, right = confidence_and_margin(logits.to(device), targets.to(device))
            conf, margin = distributed.gather_no_grad(conf)[src], distributed.gather_no_grad(margin)[src]
            right = distributed.gather_no_grad(right.to(torch.uint8))[src].bool()  # gloo has no bool
            forgot = self.correct[rows] & ~right & ~first
            self.forgetting.index_copy_(0, rows, self.forgetting[rows] + forgot.long())
            self.confidence.index_copy_(0, rows, conf)
            self.margin.index_copy_(0, rows, margin)
            self.correct.index_copy_(0, rows, right)
        self.seen.index_copy_(0, rows, self.seen[rows] + 1)
