"""Diverse anchor mining: each epoch's anchors are chosen greedily inside a band of similarity
to the anchors already chosen, skipping both outliers and near-duplicates.

Mohwald, Jenicek and Chum, "Dark Side Augmentation: Generating Diverse Night Examples for
Metric Learning", ICCV 2023.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval, Le
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import DataSampler
from sdk.state import ResizableBuffers


def similarity_band(valid: int, similar_exclude: float, similar_include: float) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of the band in the ascending order of the ``valid`` remaining
    candidates: ``hi = max(floor(valid (1 - exclude)), 1)``, ``lo = min(floor(valid (1 - include)),
    hi - 1)``; the ``exclude`` most similar and the ``1 - include`` least similar are skipped."""
    hi = max(int(valid * (1 - similar_exclude)), 1)
    return min(int(valid * (1 - similar_include)), hi - 1), hi


def diverse_anchors(embeddings: Tensor, num_anchors: int, *, similar_exclude: float = 0.2,
                    similar_include: float = 0.8, choices: Tensor | None = None) -> Tensor:
    """Greedy diverse selection of ``num_anchors`` rows of a candidate pool ``embeddings`` [P, D].

    Starts from row 0. Each further anchor: ``m_j = max_{a chosen} cos(z_j, z_a)`` for every
    remaining candidate j, sorted ascending; pick from the band :func:`similarity_band` of that
    order the element at ``floor(u (hi - lo))`` for ``u = choices[t]`` in [0, 1) (uniform at
    random), or the band's last element when ``choices`` is None. Returns pool positions [Q].
    """
    if embeddings.dim() != 2:
        raise ShapeError(f"diverse_anchors: expected embeddings [P, D], got {list(embeddings.shape)}")
    p = embeddings.shape[0]
    if not 1 <= num_anchors <= p:
        raise ConfigError(f"diverse_anchor_mining: num_anchors must be in [1, pool size {p}], got "
                          f"{num_anchors}", param="num_anchors")
    if choices is not None and choices.shape != (num_anchors - 1,):
        raise ShapeError(f"diverse_anchors: choices must have shape [{num_anchors - 1}], got "
                         f"{list(choices.shape)}")
    z = F.normalize(embeddings.detach().to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
    most = torch.full((p,), -2.0, dtype=z.dtype, device=z.device)
    taken = torch.zeros(p, dtype=torch.bool, device=z.device)
    idx = torch.zeros((), dtype=torch.long, device=z.device)
    picks = [idx]
    for t in range(1, num_anchors):
        taken[idx] = True
        most = torch.maximum(most, z @ z[idx])
        lo, hi = similarity_band(p - t, similar_exclude, similar_include)
        order = torch.where(taken, 3.0, most).argsort(stable=True)  # chosen ones sort last
        if choices is None:
            pos = torch.tensor(hi - lo - 1, device=z.device)
        else:
            pos = (choices[t - 1].to(z.device) * (hi - lo)).long().clamp(max=hi - lo - 1)
        idx = order[lo + pos]
        picks.append(idx)
    return torch.stack(picks)


class DiverseAnchorMining(ResizableBuffers, DataSampler):
    """Data-level sampler yielding this epoch's diverse anchors (dataset positions).

    At ``on_epoch_start`` it embeds the training set (``trainer.embed``), draws a random pool
    of ``pool_size`` candidates (capped at the dataset size) and keeps ``num_anchors`` of them
    chosen by :func:`diverse_anchors` (random band element when ``shuffle``, else the band's
    last). Draws come from a generator seeded with ``seed + epoch``; the chosen anchors are a
    buffer, so a resumed run continues the same epoch. Outside a trainer call :meth:`select`.
    """

    resizable_buffers = ("anchors",)  # the selection's size is known once it is made

    def __init__(self, num_anchors: Annotated[int, Ge(1)] = 2000, pool_size: int = 10000,
                 similar_exclude: Annotated[float, Interval(ge=0, le=1)] = 0.2,
                 similar_include: Annotated[float, Le(1)] = 0.8, shuffle: bool = True, seed: int = 0):
        nn.Module.__init__(self)
        if pool_size < num_anchors:
            raise ConfigError(f"diverse_anchor_mining: pool_size ({pool_size}) must be >= "
                              f"num_anchors ({num_anchors})", param="pool_size")
        if not similar_exclude <= similar_include:
            raise ConfigError(f"diverse_anchor_mining: similar_include must be in [similar_exclude="
                              f"{similar_exclude}, 1], got {similar_include}", param="similar_include")
        self.num_anchors, self.pool_size, self.seed, self.shuffle = num_anchors, pool_size, seed, shuffle
        self.similar_exclude, self.similar_include = similar_exclude, similar_include
        self.register_buffer("anchors", torch.zeros(0, dtype=torch.long))
        self.dataset_size: int | None = None  # told by bind()

    def bind(self, dataset: Any) -> None:
        """Remember the training set's size: anchors restored from a checkpoint must index it."""
        self.dataset_size = len(dataset)

    def select(self, embeddings: Tensor, epoch: int = 0) -> Tensor:
        """Choose the anchors among the rows of ``embeddings`` [N, D] (dataset order)."""
        n = embeddings.shape[0]
        pool_size = min(self.pool_size, n)
        if self.num_anchors > pool_size:
            raise ConfigError(f"diverse_anchor_mining: num_anchors ({self.num_anchors}) exceeds the "
                              f"candidate pool ({pool_size} of {n} samples)", param="num_anchors")
        g = torch.Generator().manual_seed(self.seed + epoch)
        pool = torch.randperm(n, generator=g)[:pool_size]
        choices = torch.rand(self.num_anchors - 1, generator=g) if self.shuffle else None
        picks = diverse_anchors(embeddings[pool.to(embeddings.device)], self.num_anchors,
                                similar_exclude=self.similar_exclude,
                                similar_include=self.similar_include, choices=choices)
        self.anchors = pool.to(self.anchors.device)[picks.to(self.anchors.device)]
        return self.anchors

    def on_epoch_start(self, state: State) -> None:
        self.select(state.trainer.embed(state.trainer.train_loader), epoch=state.epoch)

    def __iter__(self) -> Iterator[int]:
        if self.anchors.numel() == 0:
            raise RequirementError("sampler 'diverse_anchor_mining' has no anchors yet: run it in a "
                                   "Trainer (it selects at on_epoch_start) or call select(embeddings)")
        order = self.anchors.tolist()
        if self.dataset_size is not None and max(order) >= self.dataset_size:
            raise ShapeError(f"sampler 'diverse_anchor_mining': the anchors (restored from a checkpoint "
                             f"of another dataset?) index up to {max(order)}, but the dataset holds "
                             f"{self.dataset_size} samples")
        return iter(order)

    def __len__(self) -> int:
        return self.num_anchors


CARD = Card(
    name="diverse_anchor_mining", kind="sampler",
    title="Dark Side Augmentation: Generating Diverse Night Examples for Metric Learning",
    paper="arXiv:2309.16351",
    summary="Per-epoch anchor selection: greedily add anchors drawn from the middle similarity "
            "band (to the anchors chosen so far) of a random candidate pool.",
    formula="pool: P random samples (P = min(pool_size, N)); a_1 = pool[0]; for t >= 2: "
            "m_j = max_{a in A} cos(z_j, z_a) over remaining j, sorted ascending; v = P - |A|; "
            "hi = max(floor(v (1 - exclude)), 1), lo = min(floor(v (1 - include)), hi - 1); "
            "a_t = uniform from positions [lo, hi) (last one without shuffle); "
            "defaults Q = 2000, P = 10000, exclude = 0.2, include = 0.8",
    left_out="The day-to-night GAN generator with edge consistency, the jointly trained edge "
             "detector, the GeM retrieval backbone and the positive / hard-negative tuple mining "
             "around each anchor (contrastive loss of cirtorch); the 'mark_easy' difficulty tags.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DiverseAnchorMining, card=CARD)
