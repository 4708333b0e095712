"""VICReg: invariance, variance and covariance regularisation of two views' embeddings.

Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022.
"""

from __future__ import annotations

import itertools
from typing import Annotated

import torch
from annotated_types import Ge, Gt

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import covariance_term, invariance_term, variance_term
from sdk.types import Batch, Loss, Views


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, gamma: float = 1.0,
                 eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s(Z, Z'), (v(Z) + v(Z')) / 2, c(Z) + c(Z'))``: invariance, variance and covariance as
    the authors' code combines them (:mod:`sdk.ssl`)."""
    inv = invariance_term(z1, z2)
    var = (variance_term(z1, gamma, eps) + variance_term(z2, gamma, eps)) / 2
    cov = covariance_term(z1) + covariance_term(z2)
    return inv, var, cov


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 25.0, mu: float = 25.0,
                nu: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``lambd s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z'))`` (eq. 6)."""
    inv, var, cov = vicreg_terms(z1, z2, gamma, eps)
    return lambd * inv + mu * var + nu * cov


class VICReg(Objective):
    """VICReg over two (or more: every pair, averaged) views. The variance and covariance are
    statistics of the batch: ``gather`` ("auto": under DDP) computes every term over the batch
    of every rank, as the authors' code gathers the embeddings; each rank then computes the
    same global loss. A (global) batch of one has no variance: :class:`sdk.ShapeError`."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, lambd: Annotated[float, Ge(0)] = 25.0, mu: Annotated[float, Ge(0)] = 25.0,
                 nu: Annotated[float, Ge(0)] = 1.0, gamma: Annotated[float, Gt(0)] = 1.0,
                 eps: Annotated[float, Gt(0)] = 1e-4, gather: Gather = "auto"):
        super().__init__()
        self.lambd, self.mu, self.nu, self.gamma, self.eps = lambd, mu, nu, gamma, eps
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        zs = views.embeddings
        if resolve_gather(self.gather):
            zs = [gather_with_grad(z) for z in zs]
        if zs[0].shape[0] < 2:
            raise ShapeError(f"objective 'vicreg': Views.embeddings hold {zs[0].shape[0]} sample; "
                             "the variance and covariance need a batch of at least 2")
        parts = [vicreg_terms(a, b, self.gamma, self.eps) for a, b in itertools.combinations(zs, 2)]
        inv, var, cov = (torch.stack(p).mean() for p in zip(*parts))
        value = self.lambd * inv + self.mu * var + self.nu * cov
        return Loss(value=value, logs={"invariance": inv.detach(), "variance": var.detach(),
                                       "covariance": cov.detach()})


CARD = Card(
    name="vicreg", kind="objective",
    title="VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
    paper="arXiv:2105.04906",
    summary="Invariance (mean squared error between views) plus a hinge keeping each "
            "dimension's standard deviation above gamma and a penalty decorrelating dimensions.",
    formula="s = ||Z - Z'||^2 / (N D); v(Z) = mean_j max(0, gamma - sqrt(Var(z^j) + eps)); "
            "c(Z) = sum_{i != j} Cov(Z)_ij^2 / D; L = lambd s + mu (v(Z) + v(Z'))/2 + nu (c(Z) + c(Z'))",
    left_out="The variance terms are averaged, (v(Z) + v(Z'))/2, as in the authors' code; the "
             "paper's eq. 6 writes their sum. The expander is the encoder's head "
             "(projection_head with hidden_dim=8192, out_dim=8192, layers=3 for the paper's); "
             "LARS is not part of the loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VICReg, card=CARD)
