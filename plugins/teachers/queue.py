"""MoCo's dictionary as a queue: a FIFO of momentum-encoder keys used as extra negatives.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(arXiv:1911.05722); Chen et al., "Improved Baselines with Momentum Contrastive Learning"
(MoCo v2, arXiv:2003.04297).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.distributed import gather_no_grad
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input
from sdk.keys import NEGATIVES, NEGATIVES_INDEX, NEGATIVES_MASK, TEACHER
from sdk.momentum import EMATeacher
from sdk.state import ResizableBuffers
from sdk.types import Batch, Views


def enqueue(keys: Tensor, key_index: Tensor, ptr: Tensor, filled: Tensor, new: Tensor,
            new_index: Tensor) -> None:
    """Write ``new`` [b, D] (and their dataset indices) at ``ptr`` of the ring ``keys`` [K, D],
    oldest first out; ``ptr`` and ``filled`` advance. In place, without host synchronisation."""
    size, b = keys.shape[0], new.shape[0]
    slots = (ptr + torch.arange(b, device=keys.device)) % size
    if b > size:
        slots, new, new_index = slots[-size:], new[-size:], new_index[-size:]
    keys.index_copy_(0, slots, new.to(keys.dtype))
    key_index.index_copy_(0, slots, new_index.to(key_index.dtype))
    ptr.copy_((ptr + b) % size)
    filled.copy_((filled + b).clamp(max=size))


class QueueTeacher(ResizableBuffers, EMATeacher):
    """A momentum encoder (``ema``'s update, ``theta_k <- m theta_k + (1 - m) theta_q``) and a
    FIFO queue of its L2-normalised keys ``[K, D]``.

    After each micro-batch (``observe``; with gradient accumulation every micro-batch of a step,
    while the momentum update runs once per optimizer step) the keys of the last view
    (``Views.extras["teacher"][-1]``, MoCo's ``k``; the student's embeddings if no teacher output
    is present) are enqueued, gathered from every rank so all ranks hold the same queue. The
    filled entries are its ``memory()``, which the engine merges into ``Views.extras`` before
    every objective call, in training and validation (``sdk.keys.NEGATIVES``, with their validity
    mask and dataset indices: an anchor never counts its own sample's older keys), so every
    contrastive objective adds them to its denominator. Queue, pointer and fill level are
    buffers: checkpoints carry them.
    """

    produces = frozenset({Input.EXTRA_NEGATIVES})

    resizable_buffers = ("keys",)
    memory_keys = (NEGATIVES, NEGATIVES_MASK, NEGATIVES_INDEX)

    def __init__(self, student: nn.Module | None = None, size: Annotated[int, Ge(1)] = 65536,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.999,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.999):
        super().__init__(student=student, momentum=momentum, final_momentum=final_momentum)
        self.size = size
        self.register_buffer("keys", torch.zeros(size, 0))
        self.register_buffer("key_index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))


    @torch.no_grad()
    def push(self, keys: Tensor, index: Tensor | None = None) -> None:
        """Enqueue ``keys`` [b, D] (normalised, detached, gathered across ranks)."""
        keys = F.normalize(keys.detach().float(), dim=-1)
        index = (torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
                 if index is None else index.to(keys.device))
        keys, index = gather_no_grad(keys), gather_no_grad(index)
        if self.keys.shape[1] != 0 and self.keys.shape[1] != keys.shape[1]:
            raise ShapeError(f"teacher {self.name!r}: keys of width {keys.shape[1]}, but the queue "
                             f"holds keys of width {self.keys.shape[1]}")
        if self.keys.shape[1] == 0:  # the width is learnt from the first keys
            self.keys = keys.new_zeros(self.size, keys.shape[1])
            self.key_index.fill_(-1)
            self.ptr.zero_()
            self.filled.zero_()
        enqueue(self.keys, self.key_index, self.ptr, self.filled, keys, index)

    def memory(self) -> dict[str, Tensor]:
        """The queue as ``Views.extras`` entries, merged by the engine before every objective
        call in training and validation (empty before the first push)."""
        if self.keys.shape[1] == 0:
            return {}
        valid = torch.arange(self.size, device=self.keys.device) < self.filled
        return {NEGATIVES: self.keys, NEGATIVES_MASK: valid, NEGATIVES_INDEX: self.key_index}

    @torch.no_grad()
    def observe(self, *, views: Views, batch: Batch | None = None, step: int = 0,
                max_steps: int | None = None) -> None:
        """Enqueue the keys of one micro-batch (every micro-batch of an accumulated step)."""
        new = views.extras.get(TEACHER, views.embeddings)[-1]
        self.push(new, None if batch is None else batch.index)

    @torch.no_grad()
    def update(self, *, student: nn.Module | None = None, views: Views | None = None,
               batch: Batch | None = None, step: int = 0, max_steps: int | None = None) -> None:
        """The momentum update (once per optimizer step); ``views`` given: enqueue them too."""
        super().update(student=student, views=views, batch=batch, step=step, max_steps=max_steps)
        if views is not None:
            self.observe(views=views, batch=batch)


CARD = Card(
    name="queue", kind="teacher",
    title="Momentum Contrast for Unsupervised Visual Representation Learning (MoCo v2 queue)",
    paper="arXiv:1911.05722",
    summary="Momentum encoder plus a FIFO queue of its normalised keys, published as extra "
            "negatives for every contrastive objective; queue state is checkpointed.",
    formula="theta_k <- m theta_k + (1 - m) theta_q; queue <- enqueue(normalize(k)), dequeue "
            "oldest (size K); negatives_i = {queue entries filled, not of sample i}",
    left_out="MoCo's shuffling BN across GPUs; the positive (q . k+) and the in-batch negatives are "
             "the objective's choice (nt_xent contrasts the student's views and adds the queue); "
             "unlike MoCo, a sample's own older keys are not its negatives.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(QueueTeacher, card=CARD)
