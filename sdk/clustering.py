"""Whole-dataset clustering used by plugins that refresh state between epochs.

``kmeans`` is Lloyd's algorithm with k-means++ seeding, vectorised over points (loops run over
iterations and seeds only, never over samples). ``ordered_embeddings`` embeds the training set
in dataset order through ``trainer.embed`` so that row ``i`` belongs to ``Batch.index == i``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeds: the first uniformly, each next with probability ~ squared distance."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device=generator.device if generator else "cpu")
    centres = [x[first.to(x.device)].squeeze(0)]
    d2 = (x - centres[0]).pow(2).sum(-1)
    for _ in range(1, k):
        probs = d2.clamp_min(0) + torch.finfo(x.dtype).tiny
        pick = torch.multinomial(probs.to(generator.device if generator else x.device), 1,
                                 generator=generator).to(x.device)
        centres.append(x[pick].squeeze(0))
        d2 = torch.minimum(d2, (x - centres[-1]).pow(2).sum(-1))
    return torch.stack(centres)


def kmeans(x: Tensor, k: int, *, iters: int = 25, generator: torch.Generator | None = None,
           init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on rows of ``x`` [N, D]: returns ``(centres [k, D], assignment [N])``.

    Seeds with k-means++ unless ``init`` [k, D] is given; an empty cluster keeps its centre.
    Runs a fixed number of iterations (no convergence test, so no host synchronisation).
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans: expected x of shape [N, D], got {list(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: need 1 <= k <= N, got k={k}, N={x.shape[0]}")
    x = x.detach().float()
    centres = kmeans_plus_plus(x, k, generator) if init is None else init.detach().float().clone()
    assign = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.zeros(k, device=x.device).index_add_(0, assign, torch.ones_like(assign,
                                                                                      dtype=x.dtype))
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        assign = torch.cdist(x, centres).argmin(dim=1)
    return centres, assign


def ordered_embeddings(trainer: Any) -> Tensor:
    """``trainer.embed`` over the training set in dataset order (row ``i`` is sample ``i``).

    Rebuilds ``trainer.train_loader`` without shuffling (same dataset, batch size and collate
    function), so per-sample state keyed by ``Batch.index`` lines up with the rows.
    """
    loader = trainer.train_loader
    ordered = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size or 256,
                                          shuffle=False, collate_fn=loader.collate_fn)
    return trainer.embed(ordered)
