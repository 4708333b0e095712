"""Instance discrimination's memory bank: one momentum-updated vector per training sample.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
(arXiv:1805.01978).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.distributed import gather_no_grad
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Teacher
from sdk.state import ResizableBuffers
from sdk.types import Batch, Views, check_ids


def memory_update(bank: Tensor, filled: Tensor, index: Tensor, z: Tensor, momentum: float) -> None:
    """``v_i <- normalize(m v_i + (1 - m) z_i)`` for the samples ``index``; a sample's first
    vector is ``normalize(z_i)``. In place on ``bank`` [n, D] and ``filled`` [n]."""
    z = F.normalize(z.float(), dim=-1)
    old = bank.index_select(0, index)  # unlike bank[index], refuses negative ids
    mixed = F.normalize(momentum * old + (1.0 - momentum) * z, dim=-1)
    bank.index_copy_(0, index, torch.where(filled[index, None], mixed, z).to(bank.dtype))
    filled.index_fill_(0, index, True)


class MemoryBank(ResizableBuffers, Teacher):
    """Per-sample vectors ``v_i`` [num_samples, D] keyed by ``Batch.index``.

    After each micro-batch (``observe``: with gradient accumulation, every micro-batch of a
    step), ``v_i <- normalize(m v_i + (1 - m) z_i)`` with ``z_i`` the normalised mean
    of the sample's normalised view embeddings (detached; gathered across ranks). Its
    ``memory()``, merged by the engine into ``Views.extras`` before every objective call, holds
    ``num_negatives`` entries drawn uniformly (with replacement) among the filled ones — the
    whole bank when ``num_negatives >= num_samples`` — as ``keys.NEGATIVES``; an anchor never
    counts its own sample's entry.
    """

    produces = frozenset({Input.EXTRA_NEGATIVES})

    resizable_buffers = ("bank",)
    memory_keys = (keys.NEGATIVES, keys.NEGATIVES_MASK, keys.NEGATIVES_INDEX)

    def __init__(self, num_samples: Annotated[int, Ge(1)] = 65536,
                 momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.5,
                 num_negatives: Annotated[int, Ge(1)] = 4096):
        super().__init__()
        self.num_samples, self.momentum, self.num_negatives = num_samples, momentum, num_negatives
        self.register_buffer("bank", torch.zeros(num_samples, 0))
        self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool))


    def on_fit_start(self, state: State) -> None:
        dataset = getattr(state.trainer.train_loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) > self.num_samples:
            raise ConfigError(f"memory_bank: num_samples={self.num_samples} is smaller than the "
                              f"training set ({len(dataset)} samples)", param="num_samples")

    def lookup(self, index: Tensor) -> Tensor:
        """The stored vectors of the samples ``index`` (not ``forward``: the engine would take a
        teacher with a ``forward`` for a network and feed it the inputs)."""
        return self.bank[index]

    @torch.no_grad()
    def push(self, z: Tensor, index: Tensor) -> None:
        """Momentum-update the entries ``index`` with embeddings ``z`` [b, D]."""
        owner = f"teacher {self.name!r}"
        check_ids(owner, "Batch.index", index)
        z, index = gather_no_grad(z.detach()), gather_no_grad(index.to(z.device))
        if self.bank.shape[1] == 0:  # the width is learnt from the first embeddings
            self.bank = z.new_zeros(self.num_samples, z.shape[1], dtype=torch.float32)
            self.filled.zero_()
        elif self.bank.shape[1] != z.shape[1]:
            raise ShapeError(f"{owner}: embeddings of width {z.shape[1]}, but the bank holds vectors "
                             f"of width {self.bank.shape[1]}")
        try:
            memory_update(self.bank, self.filled, index, z, self.momentum)
        except (IndexError, RuntimeError):  # ids out of range (on CPU; CUDA asserts on the device)
            check_ids(owner, "Batch.index", index, self.num_samples)
            raise

    def memory(self) -> dict[str, Tensor]:
        """Drawn entries as ``Views.extras``, merged by the engine before every objective call in
        training and validation (empty before the first push)."""
        if self.bank.shape[1] == 0:
            return {}
        if self.num_negatives >= self.num_samples:
            chosen = torch.arange(self.num_samples, device=self.bank.device)
        else:
            weights = self.filled.float() + torch.finfo(torch.float32).tiny
            chosen = torch.multinomial(weights, self.num_negatives, replacement=True)
        return {keys.NEGATIVES: self.bank[chosen], keys.NEGATIVES_MASK: self.filled[chosen],
                keys.NEGATIVES_INDEX: chosen}

    @torch.no_grad()
    def observe(self, *, views: Views, batch: Batch | None = None, step: int = 0,
                max_steps: int | None = None) -> None:
        """Update the entries of one micro-batch's samples (every micro-batch of a step)."""
        if batch is None or batch.index is None:
            raise RequirementError(f"teacher {self.name!r} needs Batch.index")
        z = torch.stack([F.normalize(v.detach().float(), dim=-1) for v in views.embeddings]).sum(0)
        self.push(z, batch.index)

    @torch.no_grad()
    def update(self, *, student: nn.Module | None = None, views: Views | None = None,
               batch: Batch | None = None, step: int = 0, max_steps: int | None = None) -> None:
        """Observe ``views`` when given (the engine has observed every micro-batch already and
        passes none)."""
        if views is not None:
            self.observe(views=views, batch=batch)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        views = Views(embeddings=tuple(torch.randn(batch_size, 16, generator=generator)
                                       for _ in range(2)))
        return {"views": views, "batch": Batch(index=torch.randperm(batch_size, generator=generator))}


CARD = Card(
    name="memory_bank", kind="teacher",
    title="Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
    paper="arXiv:1805.01978",
    summary="Memory bank of one momentum-updated, normalised vector per training sample (keyed by "
            "Batch.index), published as extra negatives for every contrastive objective; "
            "checkpointed.",
    formula="v_i <- normalize(m v_i + (1 - m) z_i) for i in batch (m = 0.5); negatives: "
            "num_negatives uniform draws among filled v_j, j != i",
    left_out="InstDisc's NCE approximation and proximal regulariser: the objective using the bank "
             "decides the loss (e.g. nt_xent adds the drawn entries to its denominator). One draw "
             "of negatives is shared by the whole batch; an entry starts at its sample's first "
             "embedding instead of a random vector (unvisited entries are never negatives).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MemoryBank, card=CARD)
