"""VICReg: variance-invariance-covariance regularisation of two (or more) views.

Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022, arXiv:2105.04906 (eq. 1-6 and Algorithm 1).

For embeddings ``Z, Z'`` of shape ``[n, d]``::

    s(Z, Z') = mean_{i,k} (z_ik - z'_ik)^2                        (invariance)
    v(Z)     = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps))      (variance, unbiased Var)
    c(Z)     = 1/d sum_{i != j} C(Z)_ij^2,  C(Z) = (Z - mean)^T (Z - mean) / (n - 1)
    L        = lambd * s + mu * (v(Z) + v(Z')) + nu * (c(Z) + c(Z'))

Paper defaults: ``lambd = mu = 25``, ``nu = 1``, ``gamma = 1``, ``eps = 1e-4``.
"""

from __future__ import annotations

import itertools
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from sdk import Batch, Card, Loss, ShapeError, Views, hookimpl
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.interfaces import Objective


def invariance(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``s(Z, Z')``: mean squared difference over samples and dimensions."""
    return F.mse_loss(z1.float(), z2.float())


def variance(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``v(Z)``: hinge on the regularised standard deviation of every dimension."""
    std = torch.sqrt(z.float().var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance(z: torch.Tensor) -> torch.Tensor:
    """``c(Z)``: squared off-diagonal entries of the covariance matrix, divided by ``d``."""
    z = z.float()
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-4,
                 gather: Gather = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unweighted ``(s, v(Z) + v(Z'), c(Z) + c(Z'))`` of one pair of views.

    With ``gather`` on (True, or "auto" under DDP) the variance and covariance use the batch of
    every rank (as the reference implementation does); the invariance term is per sample, so it
    stays local.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ShapeError(f"template_vicreg: expected two [n, d] embeddings of one shape, got "
                         f"{list(z1.shape)} and {list(z2.shape)}")
    if z1.shape[0] < 2:
        raise ShapeError(f"template_vicreg: variance and covariance need a batch of at least 2 "
                         f"samples, got shape {list(z1.shape)}")
    s = invariance(z1, z2)
    if resolve_gather(gather):
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    v = variance(z1, gamma, eps) + variance(z2, gamma, eps)
    c = covariance(z1) + covariance(z2)
    return s, v, c


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 25.0, mu: float = 25.0,
                nu: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``lambd * s(Z, Z') + mu * (v(Z) + v(Z')) + nu * (c(Z) + c(Z'))``."""
    s, v, c = vicreg_terms(z1, z2, gamma=gamma, eps=eps)
    return lambd * s + mu * v + nu * c


class VICReg(Objective):
    """VICReg over two views; with more views, the mean over every pair of views.

    ``logs`` hold the unweighted ``invariance``, ``variance`` and ``covariance`` terms. The
    variance and covariance couple the samples of a batch: ``gather`` ("auto": under DDP)
    computes them over every rank's batch.
    """

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, lambd: Annotated[float, Ge(0)] = 25.0, mu: Annotated[float, Ge(0)] = 25.0,
                 nu: Annotated[float, Ge(0)] = 1.0, gamma: Annotated[float, Gt(0)] = 1.0,
                 eps: Annotated[float, Gt(0)] = 1e-4, gather: Gather = "auto"):
        super().__init__()
        self.lambd, self.mu, self.nu = lambd, mu, nu
        self.gamma, self.eps, self.gather = gamma, eps, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        terms = [vicreg_terms(a, b, gamma=self.gamma, eps=self.eps, gather=self.gather)
                 for a, b in itertools.combinations(views.embeddings, 2)]
        s, v, c = (torch.stack(t).mean() for t in zip(*terms))
        value = self.lambd * s + self.mu * v + self.nu * c
        return Loss(value=value, logs={"invariance": s.detach(), "variance": v.detach(),
                                       "covariance": c.detach()})


CARD = Card(
    name="template_vicreg", kind="objective",
    title="VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
    paper="arXiv:2105.04906",
    summary="Keeps every embedding dimension's standard deviation above gamma, decorrelates "
            "dimensions, and pulls the two views of a sample together; no negatives.",
    formula="L = lambd * mean((Z - Z')^2) + mu * [v(Z) + v(Z')] + nu * [c(Z) + c(Z')]; "
            "v(Z) = mean_j relu(gamma - sqrt(Var(z^j) + eps)); "
            "c(Z) = sum_{i!=j} Cov(Z)_ij^2 / d",
    left_out="The expander (projector) network and the LARS optimiser are the user's choice. "
             "The authors' repository halves the variance term; mu=12.5 reproduces it.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VICReg, card=CARD)
