"""DDFA (Discriminate, Discretise, Factorise, Adjust): unsupervised classification under latent
label shift. A domain discriminator ``p(d | x)`` trained on data from several domains whose
class priors ``p(y | d)`` differ (``p(x | y)`` shared) is discretised by k-means, the
cluster-by-domain matrix is factorised into ``p(y | d)`` and ``p(cluster | y)``, and
``p(y | x)`` is solved from ``p(d | x) = sum_y p(d | y) p(y | x)``.

Roberts, Mani, Garg, Lipton, "Unsupervised Learning under Latent Label Shift", NeurIPS 2022
(arXiv:2207.13179), Algorithm 1; the adjustment as in the authors' code (``solve_p_y_x``,
``solve_p_y_x_d``), the factorisation by anchor clusters (the paper's anchor condition).
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import Tensor

from sdk.card import Card
from sdk.cluster import kmeans
from sdk.errors import NotFittedError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback

__all__ = ["CARD", "DDFALatentLabelShift", "anchor_factorise", "factorise", "solve_p_y_x"]

_TINY = 1e-12


def anchor_factorise(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``Q = A B`` for ``Q [m, D] = p(cluster | d)`` with ``A = p(cluster | y) [m, k]`` and ``B =
    p(y | d) [k, D]`` (both column-stochastic) under the anchor condition (each class has a
    cluster no other class reaches). Each row of ``Q`` normalised to sum 1 is a convex
    combination of the normalised rows of ``B``, and an anchor cluster's row is one of them:
    the ``k`` anchors are found by successive projection (the row of largest norm, then
    projecting it out; Gillis & Vavasis 2014), ``B_y = s_y Qbar_{anchor(y)}`` with the scales
    ``s`` solving ``sum_y B_yd = 1`` for every domain (least squares), and ``A = [Q pinv(B)]_+``
    with columns normalised."""
    qbar = q / q.sum(dim=1, keepdim=True).clamp_min(_TINY)
    residual = qbar.clone()
    anchors = []
    for _ in range(k):
        i = int(residual.norm(dim=1).argmax())
        anchors.append(i)
        u = residual[i] / residual[i].norm().clamp_min(_TINY)
        residual = residual - (residual @ u)[:, None] * u
    rows = qbar[anchors]  # [k, D]
    scales = torch.linalg.lstsq(rows.T, torch.ones(q.shape[1], 1, dtype=q.dtype, device=q.device)).solution
    b = (rows * scales).clamp_min(0)
    b = b / b.sum(dim=0, keepdim=True).clamp_min(_TINY)
    a = (q @ torch.linalg.pinv(b)).clamp_min(0)
    return a / a.sum(dim=0, keepdim=True).clamp_min(_TINY), b


def factorise(p_d_x: Tensor, domains: Tensor, num_classes: int, n_clusters: int,
              seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Discretise and factorise: k-means of ``p(d | x) [N, D]`` into ``n_clusters``; ``Q [m, D]``
    = ``p(cluster | d)`` (each domain's histogram of clusters), factorised by
    :func:`anchor_factorise`. Returns ``(p(y | d) [K, D], p(cluster | y) [m, K], centres
    [m, D])``."""
    n_domains = p_d_x.shape[1]
    labels, centres = kmeans(p_d_x, n_clusters, iters=100, seed=seed)
    flat = labels * n_domains + domains.to(labels.device)
    counts = torch.bincount(flat, minlength=n_clusters * n_domains).view(n_clusters, n_domains)
    q = counts.double() / counts.sum(dim=0, keepdim=True).clamp_min(1)
    p_x_y, p_y_d = anchor_factorise(q, num_classes)
    return p_y_d, p_x_y, centres


def solve_p_y_x(p_d_x: Tensor, p_d_y: Tensor) -> Tensor:
    """``p(y | x) [N, K]`` from ``p(d | x) = sum_y p(d | y) p(y | x)``: the least-squares
    solution ``pinv(p(d | y)) p(d | x)`` (the authors' ``solve_p_y_x``), clipped at 0 and
    renormalised to a distribution."""
    raw = p_d_x.to(p_d_y.dtype) @ torch.linalg.pinv(p_d_y).T
    raw = raw.clamp_min(0)
    return raw / raw.sum(dim=1, keepdim=True).clamp_min(_TINY)


class DDFALatentLabelShift(Callback):
    """After training a domain discriminator (the encoder's outputs are logits over the ``D``
    domains and the loader's targets the domain ids), ``on_fit_end`` embeds the training set
    (``trainer.embed``), takes ``p(d | x)`` = their softmax and :meth:`fit` s the latent classes:
    ``p(y | d)`` (:attr:`p_y_given_d`, ``[K, D]``), ``p(cluster | y)`` and the discretisation's
    centres. :meth:`predict_proba` gives ``p(y | x)`` from ``p(d | x)``; with the domains of the
    rows also ``p(y | x, d) ∝ p(y | x) p(d | y)``. The latent classes are identified up to a
    permutation. Everything fitted is in ``state_dict``."""

    def __init__(self, num_classes: Annotated[int, Ge(2)] = 2,
                 n_clusters: Annotated[int | None, Ge(1)] = None, seed: int = 0):
        self.num_classes, self.n_clusters, self.seed = num_classes, n_clusters, seed
        self.p_y_given_d: Tensor | None = None
        self.p_cluster_given_y: Tensor | None = None
        self.centres: Tensor | None = None
        self.domain_prior: Tensor | None = None

    def fit(self, p_d_x: Tensor, domains: Tensor) -> DDFALatentLabelShift:
        """Fit on domain posteriors ``p(d | x) [N, D]`` and the rows' domain ids ``[N]``."""
        who = "callback 'ddfa_latent_label_shift'"
        if not isinstance(p_d_x, Tensor) or p_d_x.dim() != 2 or not p_d_x.is_floating_point():
            raise ShapeError(f"{who}: p(d | x) must be floating [N, D], got "
                             f"{list(getattr(p_d_x, 'shape', []))}")
        n, d = p_d_x.shape
        m = self.n_clusters or self.num_classes
        if d < 2 or n < m:
            raise ShapeError(f"{who}: p(d | x) {list(p_d_x.shape)} needs at least 2 domains and "
                             f"{m} rows (n_clusters)")
        if not isinstance(domains, Tensor) or domains.shape != (n,) or domains.is_floating_point():
            raise ShapeError(f"{who}: domains must be integer ids [{n}], got "
                             f"{list(getattr(domains, 'shape', []))}")
        if not bool(torch.isfinite(p_d_x).all()):
            raise ShapeError(f"{who}: p(d | x) {list(p_d_x.shape)} holds NaN or inf")
        low, high = (int(v) for v in torch.aminmax(domains))
        if low < 0 or high >= d:
            raise ShapeError(f"{who}: domains must lie in [0, {d}), got ids in [{low}, {high}]")
        if m < self.num_classes:
            raise ShapeError(f"{who}: n_clusters = {m} must be at least num_classes = "
                             f"{self.num_classes}")
        self.p_y_given_d, self.p_cluster_given_y, self.centres = factorise(
            p_d_x.detach().double(), domains.long(), self.num_classes, m, self.seed)
        self.domain_prior = torch.bincount(domains.long(), minlength=d).double() / n
        return self

    def p_d_given_y(self) -> Tensor:
        """``p(d | y) [D, K] ∝ p(y | d) p(d)`` (Bayes' rule with the domain sizes)."""
        if self.p_y_given_d is None:
            raise NotFittedError("callback 'ddfa_latent_label_shift': call fit(p_d_x, domains) "
                                 "or train with it first")
        joint = self.p_y_given_d.T * self.domain_prior[:, None]
        return joint / joint.sum(dim=0, keepdim=True).clamp_min(_TINY)

    def predict_proba(self, p_d_x: Tensor, domains: Tensor | None = None) -> Tensor:
        """``p(y | x) [N, K]``; with ``domains`` ``[N]``, ``p(y | x, d)``."""
        p_d_y = self.p_d_given_y()
        if p_d_x.dim() != 2 or p_d_x.shape[1] != p_d_y.shape[0]:
            raise ShapeError(f"callback 'ddfa_latent_label_shift': p(d | x) must be [N, "
                             f"{p_d_y.shape[0]}], got {list(p_d_x.shape)}")
        p = solve_p_y_x(p_d_x, p_d_y.to(p_d_x.device))
        if domains is None:
            return p
        p = p * p_d_y.to(p.device)[domains.long()]
        return p / p.sum(dim=1, keepdim=True).clamp_min(_TINY)

    def on_fit_end(self, state: State) -> None:
        """Fit on the trained discriminator's outputs; where they cannot be factorised (one
        output, targets that are not domain ids of its outputs, too few rows, non-finite values)
        the run's result stands and a warning says why nothing was fitted."""
        trainer = state.trainer
        logits, domains = trainer.embed(trainer.train_loader, with_targets=True)
        try:
            self.fit(logits.softmax(dim=1), domains)
        except ShapeError as exc:
            warnings.warn(f"{exc}; nothing was fitted", RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"p_y_given_d": self.p_y_given_d, "p_cluster_given_y": self.p_cluster_given_y,
                "centres": self.centres, "domain_prior": self.domain_prior}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_y_given_d, self.p_cluster_given_y = state["p_y_given_d"], state["p_cluster_given_y"]
        self.centres, self.domain_prior = state["centres"], state["domain_prior"]


CARD = Card(
    name="ddfa_latent_label_shift", kind="callback",
    title="Unsupervised Learning under Latent Label Shift", paper="arXiv:2207.13179",
    summary="Recovers latent classes without labels from several domains whose class priors "
            "differ: discretises a domain discriminator's p(d|x) by k-means, factorises the "
            "cluster-by-domain matrix into p(y|d) by its anchor clusters and solves p(y|x) "
            "from p(d|x).",
    formula="p(d|x) = sum_y p(d|y) p(y|x) (x independent of d given y); clusters c = kmeans(p(d|x)); "
            "Q_cd = p(c|d) = sum_y p(c|y) p(y|d); anchors (one cluster per class) by successive "
            "projection of the row-normalised Q, p(y|d) = s_y Qbar_anchor(y) with sum_y p(y|d) "
            "= 1, p(c|y) = [Q pinv(p(y|d))]_+ normalised; p(d|y) ∝ p(y|d) p(d); "
            "p(y|x) = [pinv(p(d|y)) p(d|x)]_+ normalised; "
            "p(y|x,d) ∝ p(y|x) p(d|y)",
    left_out="The domain discriminator is the recipe's model, trained as an ordinary classifier "
             "of the domain ids (the callback reads its outputs at the end of training on the "
             "training loader; the paper uses held-out data). The paper factorises with "
             "an anchor-word topic model (Arora et al. 2013), the authors' code with plain NMF "
             "(not identifiable without anchors); here the anchors are found by successive "
             "projection and the factors solved in closed form (the anchor condition as the "
             "paper's). The code's p(d|y) ignores the domain sizes; here Bayes' rule uses "
             "p(d). Negative least-squares solutions of p(y|x) are clipped at 0 and renormalised.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DDFALatentLabelShift, card=CARD)
