"""Views from different encoders: which tower of a multi-tower encoder encodes a view.

Image–text (two-modality) contrastive learning pairs two modalities of one sample and encodes
each with its own network (a two-tower, or dual, encoder). The Trainer calls ``encoder(x_v)``
with the view's input alone, so the tower travels with the input, as a mask does
(:mod:`sdk.masking`): a :class:`TowerView` transform returns the view's input marked with the
index of its tower (:func:`for_tower`, a :class:`TowerInput` sharing the input's data), and a
multi-tower encoder (``multi_tower``) reads the mark (:func:`split_tower`) and runs that tower.
The engine is unchanged, so runs without marks pay nothing, and everything that calls the
encoder on a view (a momentum teacher's copy, ``recompute_gradients``) sees the same mark.
Operations on a marked tensor return plain tensors; an unmarked input (``Trainer.embed``, the
recipes' kNN and linear probe, export) is encoded by tower 0.

Where a view's input comes from: the loader's ``x`` (modality A, e.g. the image), or the sample's
second modality :data:`sdk.keys.PAIRED_INPUT` in ``Batch.extras`` (modality B, e.g. the text),
``[B, ...]`` paired with ``x`` row by row. A loader yielding mappings
``{"x": image, "targets": y, "index": i, keys.PAIRED_INPUT: text}`` puts it there.

:func:`cross_modal_recall` measures what such training is for: retrieval of the paired sample of
the other modality (recall at ``k``, both directions).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk import keys
from sdk.errors import RequirementError, ShapeError
from sdk.interfaces import Transform
from sdk.types import Batch


class TowerInput(Tensor):
    """An input tensor marked with ``tower``, the index of the tower that encodes it. It shares
    the data of the input; operations on it return plain tensors. Make one with
    :func:`for_tower`; read it with :func:`split_tower`."""

    tower: int
    __torch_function__ = torch._C._disabled_torch_function_impl


def for_tower(x: Tensor, tower: int) -> TowerInput:
    """``x`` marked for tower ``tower`` (an integer >= 0)."""
    if isinstance(tower, bool) or not isinstance(tower, int) or tower < 0:
        raise ShapeError(f"for_tower: tower must be an integer >= 0, got {tower!r}")
    out = x.as_subclass(TowerInput)
    out.tower = tower
    return out


def split_tower(x: Tensor) -> tuple[Tensor, int | None]:
    """``(plain tensor, tower index or None when unmarked)``."""
    if isinstance(x, TowerInput):
        return x.as_subclass(Tensor), x.tower
    return x, None


class TowerView(Transform):
    """One view's input for tower ``tower``: the loader's ``x`` (``paired=False``) or the second
    modality ``Batch.extras[keys.PAIRED_INPUT]`` (``paired=True``), put through ``augment``
    when given, marked with :func:`for_tower`. Give the Trainer one per view, e.g.
    ``transforms=[TowerView(0), TowerView(1, paired=True)]`` for image–text pairs."""

    def __init__(self, tower: Annotated[int, Ge(0)] = 0, paired: bool = False,
                 augment: Transform | None = None):
        super().__init__()
        self.tower, self.paired, self.augment = tower, paired, augment

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        if self.paired:
            x = batch.extras.get(keys.PAIRED_INPUT)
            if x is None:
                raise RequirementError(f"transform {self.name!r} (paired=True) needs "
                                       f"Batch.extras[{keys.PAIRED_INPUT!r}], the second modality")
            if not isinstance(x, Tensor) or x.dim() == 0 or (
                    batch.batch_size is not None and x.shape[0] != batch.batch_size):
                shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ShapeError(f"transform {self.name!r}: Batch.extras[{keys.PAIRED_INPUT!r}] "
                                 f"must be [B, ...] with the batch's {batch.batch_size} rows, "
                                 f"got {shape}")
        if self.augment is not None:
            x, batch = self.augment(x, batch)
        return for_tower(x, self.tower), batch


def cross_modal_recall(za: Tensor, zb: Tensor, k: Annotated[int, Ge(1)] = 1) -> float:
    """Recall at ``k`` of paired retrieval, averaged over both directions: the fraction of rows
    ``i`` of ``za`` [N, D] whose paired row ``zb[i]`` is among the ``k`` most cosine-similar rows
    of ``zb``, and the same from ``zb`` to ``za`` (chance: ``k / N``). Ties count against."""
    if za.dim() != 2 or za.shape != zb.shape or za.shape[0] == 0:
        raise ShapeError(f"cross_modal_recall: za and zb must be paired [N, D] rows, got "
                         f"{list(za.shape)} and {list(zb.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ShapeError(f"cross_modal_recall: k must be an integer >= 1, got {k!r}")
    sim = F.normalize(za.double(), dim=1) @ F.normalize(zb.double(), dim=1).T
    hits = []
    for s in (sim, sim.T):
        own = s.diagonal()[:, None]
        rank = (s >= own).sum(dim=1)  # 1 when the paired row is strictly the most similar
        hits.append((rank <= k).double().mean())
    return float((hits[0] + hits[1]) / 2)


class PairedDataset(torch.utils.data.Dataset):
    """Items ``{"x": x[i], "targets": y[i], "index": i, keys.PAIRED_INPUT: paired[i]}``: a
    sample's two modalities, paired by row (the Trainer puts the second in ``Batch.extras``)."""

    def __init__(self, x: Tensor, paired: Tensor, y: Tensor, index: Tensor | None = None):
        if not (x.shape[0] == paired.shape[0] == y.shape[0]):
            raise ShapeError(f"PairedDataset: x, paired and y must have one row per sample, got "
                             f"{x.shape[0]}, {paired.shape[0]} and {y.shape[0]}")
        self.x, self.paired, self.y = x, paired, y
        self.index = torch.arange(x.shape[0]) if index is None else index.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "targets": self.y[i], "index": self.index[i],
                keys.PAIRED_INPUT: self.paired[i]}


def intensity_profiles(images: Tensor, shape: tuple[int, int]) -> Tensor:
    """A second modality of flattened images ``[N, H*W]``: the mean intensity of each row and
    of each column, ``[N, H + W]`` (an image's two projections, as a tomograph takes them)."""
    h, w = shape
    if images.dim() != 2 or images.shape[1] != h * w:
        raise ShapeError(f"intensity_profiles: images must be [N, {h * w}] ({h}x{w}), got "
                         f"{list(images.shape)}")
    grid = images.reshape(-1, h, w)
    return torch.cat([grid.mean(dim=2), grid.mean(dim=1)], dim=1)
