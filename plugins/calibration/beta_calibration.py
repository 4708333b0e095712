"""Beta calibration: a three-parameter map of a binary score, fitted as a logistic regression
on ``ln s`` and ``-ln(1 - s)``.

Kull, Silva Filho, Flach, "Beta calibration: a well-founded and easily implemented improvement
on logistic calibration for binary classifiers", AISTATS 2017. Binary; more classes are
calibrated one-vs-rest and renormalised.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk.calibration import FIT_DTYPE, LOG_EPS, check_fit_inputs, check_fitted, fit_lbfgs, one_vs_rest
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "BetaCalibration", "beta_features", "fit_beta"]


def beta_features(s: Tensor) -> Tensor:
    """``[..., 2]``: ``(ln s, -ln(1 - s))`` of scores ``s`` clamped to ``[1e-12, 1 - 1e-12]``."""
    s = s.to(FIT_DTYPE).clamp(LOG_EPS, 1 - LOG_EPS)
    return torch.stack([s.log(), -torch.log1p(-s)], dim=-1)


def fit_beta(s: Tensor, y: Tensor, max_iter: int = 200) -> Tensor:
    """``(a, b, c)`` per column ``[C, 3]`` of scores ``s [N, C]`` against binary targets ``y
    [N, C]``: ``mu = sigmoid(a ln s - b ln(1 - s) + c)`` by maximum likelihood; where ``a < 0``
    the fit is repeated with ``a = 0``, else where ``b < 0`` with ``b = 0`` (the order of the
    authors' code), so the map is monotone."""
    x, y = beta_features(s).transpose(0, 1), y.T.to(FIT_DTYPE)  # [C, N, 2], [C, N]
    c = x.shape[0]
    mask = torch.ones(c, 2, dtype=FIT_DTYPE, device=x.device)
    for _ in range(2):
        coef = mask.clone()  # from a = b = 1, c = 0: the identity map
        bias = torch.zeros(c, dtype=FIT_DTYPE, device=x.device)

        def loss(coef: Tensor = coef, bias: Tensor = bias, mask: Tensor = mask) -> Tensor:
            z = (x * (coef * mask)[:, None, :]).sum(-1) + bias[:, None]
            return F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(1).sum()

        fit_lbfgs([coef, bias], loss, max_iter)
        coef = coef * mask
        drop_a = coef[:, 0] < 0
        drop_b = ~drop_a & (coef[:, 1] < 0)
        if not bool((drop_a | drop_b).any()):
            break
        mask = torch.stack([(~drop_a).to(FIT_DTYPE), (~drop_b).to(FIT_DTYPE)], 1) * mask
    return torch.cat([coef, bias[:, None]], dim=1)


class BetaCalibration(ResizableBuffers, Calibrator):
    """``q = 1 / (1 + 1 / (e^c s^a / (1 - s)^b))`` for ``s = p_1`` (two classes), per class and
    renormalised otherwise."""

    inputs = "probabilities"
    resizable_buffers = ("params",)

    def __init__(self, max_iter: Annotated[int, Ge(1)] = 200):
        super().__init__()
        self.max_iter = max_iter
        self.register_buffer("params", torch.zeros(0, 3, dtype=FIT_DTYPE))

    def fit(self, probs: Tensor, labels: Tensor, **extra: Any) -> BetaCalibration:
        check_fit_inputs(self, probs, labels)
        probs = probs.detach()
        y = F.one_hot(labels.to(probs.device), probs.shape[1])
        self.params = fit_beta(probs, y, self.max_iter).to(self.params.device)
        return self

    def forward(self, probs: Tensor) -> Tensor:
        check_fitted(self, probs, self.params.shape[0])
        z = (beta_features(probs) * self.params[:, :2]).sum(-1) + self.params[:, 2]
        return one_vs_rest(z.sigmoid(), probs).to(probs.dtype)


CARD = Card(
    name="beta_calibration", kind="calibrator",
    title="Beta calibration: a well-founded and easily implemented improvement on logistic "
          "calibration for binary classifiers",
    paper="https://proceedings.mlr.press/v54/kull17a.html",
    summary="Fits the beta calibration map (the likelihood ratio of two beta distributions) to "
            "a binary score by logistic regression on ln s and -ln(1 - s), with a, b >= 0; "
            "one-vs-rest and renormalised beyond two classes.",
    formula="q = 1 / (1 + 1 / (e^c s^a / (1 - s)^b)) = sigmoid(a ln s - b ln(1 - s) + c), "
            "(a, b, c) = argmin BCE; a < 0: refit with a = 0, else b < 0: refit with b = 0",
    left_out="The two-parameter variants ('ab', 'am'); the authors' code fits scikit-learn's "
             "LogisticRegression with C = 1e11 (an almost-zero L2), here none (L-BFGS, max_iter "
             "iterations, from the identity map). Scores are clamped to [1e-12, 1 - 1e-12]. "
             "The multiclass extension (one-vs-rest) is not from the paper.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BetaCalibration, card=CARD)
