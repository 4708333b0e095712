"""Barlow Twins: redundancy reduction through the cross-correlation of two views.

Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021.
"""

from __future__ import annotations

import itertools
from typing import Annotated

import torch
from annotated_types import Ge, Gt

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import cross_correlation, off_diagonal_sq_sum
from sdk.types import Batch, Loss, Views


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3,
                      eps: float = 1e-5) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C = z1n^T z2n / N``
    (:func:`sdk.ssl.cross_correlation`)."""
    c = cross_correlation(z1, z2, eps)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    return on_diag + lambd * off_diagonal_sq_sum(c)


class BarlowTwins(Objective):
    """Barlow Twins over two (or more: every pair, averaged) views. The batch normalisation and
    the cross-correlation couple the samples of a batch: ``gather`` ("auto": under DDP) builds
    them over the batch of every rank (the global batch), as the paper's all-reduce does; each
    rank then computes the same global loss."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, lambd: Annotated[float, Ge(0)] = 5e-3, eps: Annotated[float, Gt(0)] = 1e-5,
                 gather: Gather = "auto"):
        super().__init__()
        self.lambd, self.eps, self.gather = lambd, eps, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        zs = views.embeddings
        if resolve_gather(self.gather):
            zs = [gather_with_grad(z) for z in zs]
        terms = [barlow_twins_loss(a, b, self.lambd, self.eps)
                 for a, b in itertools.combinations(zs, 2)]
        return Loss(value=torch.stack(terms).mean())


CARD = Card(
    name="barlow_twins", kind="objective",
    title="Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    paper="arXiv:2103.03230",
    summary="Drives the cross-correlation of batch-normalised embeddings of two views to the "
            "identity: invariance on the diagonal, redundancy reduction off it.",
    formula="C = BN(z1)^T BN(z2) / N; L = sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BarlowTwins, card=CARD)
