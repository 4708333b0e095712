"""Split-conformal prediction sets with the THR, APS and RAPS scores.

Angelopoulos, Bates, Malik, Jordan, "Uncertainty Sets for Image Classifiers using Conformal
Prediction", ICLR 2021 (arXiv:2009.14193): RAPS; APS is Romano, Sesia, Candès, NeurIPS 2020
(arXiv:2006.02544); THR (LAC) is Sadinle, Lei, Wasserman, JASA 2019 (arXiv:1609.00451).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from sdk.calibration import FIT_DTYPE, check_fit_inputs, check_fitted
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "ConformalPrediction", "conformal_quantile", "conformity_scores"]


def conformity_scores(probs: Tensor, score: str, u: Tensor | None, k_reg: int = 0,
                      lam: float = 0.0) -> Tensor:
    """``E [N, C]``: the non-conformity of every class of every row (larger: less conforming).

    ``thr``: ``1 - p_y``. ``aps`` / ``raps``: with ``pi`` the probabilities sorted in decreasing
    order and ``o(y)`` the rank of ``y`` (1-based), ``sum_{j < o(y)} pi_j + u pi_{o(y)}``
    (``u = 1`` when ``u`` is None: not randomised) plus, for ``raps``, ``lam (o(y) - k_reg)^+``."""
    p = probs.to(FIT_DTYPE)
    if score == "thr":
        return 1 - p
    sorted_p, order = p.sort(dim=1, descending=True, stable=True)
    before = sorted_p.cumsum(dim=1) - sorted_p  # mass ranked strictly above
    own = sorted_p if u is None else u.to(p)[:, None] * sorted_p
    e_sorted = before + own
    if score == "raps":
        rank = torch.arange(1, p.shape[1] + 1, dtype=FIT_DTYPE, device=p.device)
        e_sorted = e_sorted + lam * (rank - k_reg).clamp_min(0)
    return torch.empty_like(e_sorted).scatter_(1, order, e_sorted)


def conformal_quantile(sorted_scores: Tensor, alpha: float) -> Tensor:
    """``q = the ceil((n + 1)(1 - alpha))``-th smallest calibration score (``inf`` when that
    exceeds ``n``): the threshold of split conformal prediction (Vovk et al. 2005)."""
    n = sorted_scores.numel()
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        return sorted_scores.new_tensor(math.inf)
    return sorted_scores[k - 1]


class ConformalPrediction(ResizableBuffers, Calibrator):
    """``fit(probs, labels)`` keeps the sorted calibration scores ``E(x_i, y_i, u_i)``;
    ``predict(probs, alpha)`` returns the sets ``{y : E(x, y, u) <= q_alpha}`` as a boolean
    ``[N, C]`` mask, with ``P(y in set) >= 1 - alpha`` for exchangeable data. ``forward``
    leaves the probabilities unchanged (the method calibrates sets, not probabilities)."""

    inputs = "probabilities"
    resizable_buffers = ("scores",)

    def __init__(self, score: Annotated[str, one_of(("thr", "aps", "raps"))] = "raps",
                 alpha: Annotated[float, Gt(0), Lt(1)] = 0.1, k_reg: Annotated[int, Ge(0)] = 5,
                 lam: Annotated[float, Ge(0)] = 0.01, randomized: bool = True, seed: int = 0):
        super().__init__()
        self.score, self.alpha, self.k_reg, self.lam = score, alpha, k_reg, lam
        self.randomized, self.seed = randomized, seed
        self.register_buffer("num_classes", torch.zeros((), dtype=torch.long))
        self.register_buffer("scores", torch.zeros(0, dtype=FIT_DTYPE))

    def _u(self, n: int, offset: int, device: torch.device) -> Tensor | None:
        """The randomisation ``u ~ U[0, 1)`` of APS / RAPS: one per row, from ``seed + offset``
        (calibration and test draws are independent), so every call is deterministic."""
        if self.score == "thr" or not self.randomized:
            return None
        g = torch.Generator().manual_seed(self.seed + offset)
        return torch.rand(n, generator=g, dtype=FIT_DTYPE).to(device)

    def _all_scores(self, probs: Tensor, offset: int) -> Tensor:
        return conformity_scores(probs, self.score, self._u(probs.shape[0], offset, probs.device),
                                 self.k_reg, self.lam)

    def fit(self, probs: Tensor, labels: Tensor, **extra: Any) -> ConformalPrediction:
        check_fit_inputs(self, probs, labels)
        probs = probs.detach()
        e = self._all_scores(probs, 0).gather(1, labels.to(probs.device)[:, None]).squeeze(1)
        self.scores = e.sort().values.to(self.scores.device)
        self.num_classes.fill_(probs.shape[1])
        return self

    def threshold(self, alpha: float | None = None) -> Tensor:
        """``q_alpha`` of the calibration scores (``alpha`` None: the constructor's)."""
        alpha = self.alpha if alpha is None else alpha
        if not 0 < alpha < 1:
            raise ConfigError(f"calibrator {self.name!r}: alpha must lie in (0, 1), got {alpha}",
                              param="alpha")
        return conformal_quantile(self.scores, alpha)

    def forward(self, probs: Tensor) -> Tensor:
        check_fitted(self, probs, int(self.num_classes))
        return probs

    def predict(self, probs: Tensor, alpha: float | None = None) -> Tensor:
        """Prediction sets ``[N, C]`` (bool) at miscoverage ``alpha``."""
        q = self.threshold(alpha)
        probs = self(probs)
        return self._all_scores(probs.detach(), 1) <= q.to(probs.device)


CARD = Card(
    name="conformal_prediction", kind="calibrator",
    title="Uncertainty Sets for Image Classifiers using Conformal Prediction",
    paper="arXiv:2009.14193",
    summary="Split-conformal prediction sets with a finite-sample coverage guarantee "
            "P(y in C(x)) >= 1 - alpha, from the THR (1 - p_y), APS or RAPS (APS plus a rank "
            "penalty) scores; alpha may be chosen at predict time.",
    formula="E(x, y, u) = 1 - p_y (thr); sum_{j < o(y)} pi_j + u pi_{o(y)} [+ lam (o(y) - k_reg)^+] "
            "(aps [raps]), pi sorted decreasingly, o(y) the rank of y, u ~ U[0, 1]; "
            "q = ceil((n + 1)(1 - alpha))-th smallest E(x_i, y_i, u_i) (inf if > n); "
            "C(x) = {y : E(x, y, u) <= q}; 1 - alpha <= P(y in C) <= 1 - alpha + 1/(n + 1) "
            "for continuous scores",
    left_out="The paper's code forces at least the top class into every set (allow_zero_sets "
             "= False) and picks k_reg and lam on a tuning split; here sets may be empty (that "
             "keeps the exact upper bound), and the defaults k_reg = 5, lam = 0.01 are not the "
             "paper's (it tunes them per model). The Platt / temperature step the paper runs "
             "first is a separate calibrator (temperature_scaling). Class-conditional and "
             "non-exchangeable variants.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ConformalPrediction, card=CARD)
