"""Bayesian binning into quantiles (BBQ): a Bayesian average of equal-frequency histogram
binnings with different numbers of bins.

Naeini, Cooper, Hauskrecht, "Obtaining Well Calibrated Probabilities Using Bayesian Binning",
AAAI 2015. One-vs-rest and renormalised for more than two classes.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.calibration import FIT_DTYPE, bin_index, check_fit_inputs, check_fitted, one_vs_rest
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "BBQ", "bin_range", "binning_score"]


def bin_range(n: int, spread: float = 10.0) -> range:
    """Numbers of bins ``B`` of the models averaged: ``floor(N^(1/3) / spread) ..
    ceil(spread N^(1/3))``, at least 1 and at most ``ceil(N / 5)`` (netcal's cap)."""
    root = n ** (1 / 3)
    low = max(1, math.floor(root / spread))
    return range(low, max(low, min(math.ceil(n / 5), math.ceil(spread * root))) + 1)


def binning_score(count: Tensor, positives: Tensor, edges: Tensor, prior: float) -> tuple[Tensor, Tensor]:
    """``(log P(D | M), theta)`` of one binning ``[..., B]``: the BDeu marginal likelihood

    ``sum_b lnG(N'/B) - lnG(n_b + N'/B) + lnG(m_b + a_b) - lnG(a_b) + lnG(n_b - m_b + b_b) - lnG(b_b)``

    with ``a_b = N'/B p_b``, ``b_b = N'/B (1 - p_b)``, ``p_b`` the midpoint of bin ``b``
    (``edges [..., B + 1]`` from 0 to 1), and the posterior mean ``theta_b = (m_b + a_b) /
    (n_b + N'/B)``."""
    b = count.shape[-1]
    mid = ((edges[..., :-1] + edges[..., 1:]) / 2).clamp(1e-6, 1 - 1e-6)
    s = prior / b
    a, bb = s * mid, s * (1 - mid)
    lg = torch.lgamma
    log_ml = (lg(torch.tensor(s, dtype=count.dtype)) - lg(count + s) + lg(positives + a) - lg(a)
              + lg(count - positives + bb) - lg(bb)).sum(-1)
    return log_ml, (positives + a) / (count + s)


class BBQ(ResizableBuffers, Calibrator):
    """Per class, every equal-frequency binning of :func:`bin_range` is scored by its marginal
    likelihood; the calibrated ``q_c`` is the score-weighted mean of the models' bin estimates
    (uniform prior over models); renormalised over classes, binary for two classes."""

    inputs = "probabilities"
    resizable_buffers = ("edges", "theta", "log_weight")

    def __init__(self, prior_strength: Annotated[float, Gt(0)] = 2.0, spread: Annotated[float, Ge(1)] = 10.0):
        super().__init__()
        self.prior_strength, self.spread = prior_strength, spread
        # per model m, class c: interior edges (padded with 2), bin estimates, log posterior weight
        self.register_buffer("edges", torch.zeros(0, 0, 0, dtype=FIT_DTYPE))
        self.register_buffer("theta", torch.zeros(0, 0, 0, dtype=FIT_DTYPE))
        self.register_buffer("log_weight", torch.zeros(0, 0, dtype=FIT_DTYPE))

    def fit(self, probs: Tensor, labels: Tensor, **extra: Any) -> BBQ:
        check_fit_inputs(self, probs, labels)
        p = probs.detach().T.to(FIT_DTYPE)  # [C, N]
        c, n = p.shape
        onehot = F.one_hot(labels.to(p.device), c).T.to(FIT_DTYPE)
        sizes = bin_range(n, self.spread)
        width = max(sizes)
        edges = p.new_full((len(sizes), c, width), 2.0)  # a padding edge above every p
        theta = p.new_zeros(len(sizes), c, width)
        log_ml = p.new_zeros(len(sizes), c)
        for m, b in enumerate(sizes):
            inner = torch.quantile(p, torch.linspace(0, 1, b + 1, dtype=FIT_DTYPE, device=p.device)[1:-1],
                                   dim=1).T  # [C, B - 1], equal frequency
            idx = bin_index(p, inner) + b * torch.arange(c, device=p.device)[:, None]
            count = p.new_zeros(c * b).index_add(0, idx.reshape(-1), torch.ones_like(p).reshape(-1))
            pos = p.new_zeros(c * b).index_add(0, idx.reshape(-1), onehot.reshape(-1))
            full = torch.cat([p.new_zeros(c, 1), inner, p.new_ones(c, 1)], dim=1)
            log_ml[m], theta[m, :, :b] = binning_score(count.view(c, b), pos.view(c, b), full,
                                                       self.prior_strength)
            edges[m, :, :b - 1] = inner
        device = self.log_weight.device
        self.edges, self.theta = edges.to(device), theta.to(device)
        self.log_weight = log_ml.log_softmax(dim=0).to(device)
        return self

    def forward(self, probs: Tensor) -> Tensor:
        check_fitted(self, probs, self.log_weight.shape[1])
        p = probs.T.to(FIT_DTYPE)
        q = torch.zeros_like(p)
        for m in range(self.theta.shape[0]):
            idx = bin_index(p, self.edges[m])
            q = q + self.log_weight[m, :, None].exp() * self.theta[m].gather(1, idx)
        return one_vs_rest(q.T, probs).to(probs.dtype)


CARD = Card(
    name="bbq", kind="calibrator",
    title="Obtaining Well Calibrated Probabilities Using Bayesian Binning",
    paper="https://doi.org/10.1609/aaai.v29i1.9602",
    summary="Bayesian model averaging over equal-frequency histogram binnings (B from "
            "N^(1/3)/10 to 10 N^(1/3) bins), each weighted by its BDeu marginal likelihood; "
            "one-vs-rest, renormalised.",
    formula="P(q | p) = sum_M w_M theta_{M, b_M(p)}, w_M ∝ P(D | M) = prod_b G(N'/B)/G(n_b + N'/B) "
            "G(m_b + a_b)/G(a_b) G(n_b - m_b + b_b)/G(b_b), a_b = N'/B p_b, b_b = N'/B (1 - p_b), "
            "p_b the bin midpoint, theta_b = (m_b + a_b)/(n_b + N'/B), N' = 2",
    left_out="The number of bins is capped at ceil(N/5) (netcal's guard for tiny sets; the paper "
             "has no cap). netcal scores models by BIC and prunes them by an elbow rule; here the "
             "paper's marginal likelihood over all models, no pruning. Bins are right-closed "
             "quantile intervals with the outer edges at 0 and 1.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BBQ, card=CARD)
