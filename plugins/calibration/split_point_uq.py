"""Split-point self-consistency (SPC-UQ) for regression: the residuals of a fitted regressor,
split at its prediction into an upper and a lower side, give side-specific mean absolute
residuals (aleatoric spread, side quantiles for prediction intervals) and a self-consistency
discrepancy (epistemic uncertainty), post hoc and without retraining the regressor.

Zhao, Chen, "Post-Hoc Split-Point Self-Consistency Verification for Efficient, Unified
Quantification of Aleatoric and Epistemic Uncertainty in Deep Learning", 2025
(arXiv:2509.13262): the MAR identity, the SDS and the SDS calibration of the side quantiles as
in the authors' regression code (``SPCRegression.predict``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from sdk.calibration import FIT_DTYPE, check_fit_inputs
from sdk.card import Card
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "SplitPointUQ", "interval_factors", "self_consistency", "split_point_stats"]

COLUMNS = ("prediction", "lower", "upper", "aleatoric", "epistemic")
"""The columns of :class:`SplitPointUQ`'s output."""


def split_point_stats(residuals: Tensor, coverage: float = 0.95) -> tuple[Tensor, ...]:
    """Split-point analysis of residuals ``r = y - v`` ``[N, K]`` (K residuals per row):
    ``MAR = mean |r|``, ``MAR_up = mean(r | r > 0)``, ``MAR_down = mean(-r | r < 0)`` and the
    side quantiles ``q_up``, ``q_down`` at level ``coverage`` of ``r | r > 0`` and ``-r | r < 0``
    (0 for a side without residuals). Returns ``(mar, mar_up, mar_down, q_up, q_down)`` ``[N]``."""
    up, down = residuals > 0, residuals < 0
    mar = residuals.abs().mean(dim=1)
    mar_up = (residuals * up).sum(dim=1) / up.sum(dim=1).clamp_min(1)
    mar_down = -(residuals * down).sum(dim=1) / down.sum(dim=1).clamp_min(1)
    nan = residuals.new_tensor(float("nan"))
    q_up = torch.nanquantile(torch.where(up, residuals, nan), coverage, dim=1).nan_to_num(0.0)
    q_down = torch.nanquantile(torch.where(down, -residuals, nan), coverage, dim=1).nan_to_num(0.0)
    return mar, mar_up, mar_down, q_up, q_down


def self_consistency(mar: Tensor, mar_up: Tensor, mar_down: Tensor) -> Tensor:
    """The self-consistency discrepancy score ``SDS = |2 MAR_up MAR_down - MAR (MAR_up +
    MAR_down)|``: zero when ``MAR`` is the harmonic mean of the side MARs, which holds when the
    prediction is the conditional mean (the paper's split-point identity)."""
    return (2 * mar_up * mar_down - mar * (mar_up + mar_down)).abs()


def interval_factors(mar: Tensor, mar_up: Tensor, mar_down: Tensor) -> tuple[Tensor, Tensor]:
    """The SDS calibration of the side quantiles: ``d_up = MAR MAR_down / ((2 MAR_down - MAR)
    MAR_up)``, ``d_down = MAR MAR_up / ((2 MAR_up - MAR) MAR_down)``, each clipped to ``>= 1``
    (1 under self-consistency; 1 where a denominator is not positive)."""
    def factor(same: Tensor, other: Tensor) -> Tensor:
        den = (2 * other - mar) * same
        ratio = mar * other / den.where(den > 0, torch.ones_like(den))
        return ratio.where(den > 0, torch.ones_like(ratio)).clamp_min(1.0)

    return factor(mar_up, mar_down), factor(mar_down, mar_up)


class SplitPointUQ(ResizableBuffers, Calibrator):
    """Regression uncertainty from held-out residuals. ``fit(scores, targets)`` with scores
    ``[N, 1 + D]`` (the prediction ``v``, then ``D`` covariates) keeps the calibration rows'
    covariates (standardised) and residuals ``r = y - v``; ``calibrator(scores)`` returns
    ``[N, 5]``: ``v``, the interval ``[v - q_down, v + q_up]``, the aleatoric ``MAR`` and the
    epistemic ``SDS``, each conditioned on the row by its ``neighbours`` nearest calibration
    rows in covariate space (in the prediction where ``D = 0``). ``calibrate_intervals``
    multiplies the side quantiles by the SDS factors (:func:`interval_factors`)."""

    inputs = "regression"
    resizable_buffers = ("covariates", "residuals", "center", "scale")

    def __init__(self, coverage: Annotated[float, Gt(0), Lt(1)] = 0.95,
                 neighbours: Annotated[int, Ge(2)] = 50, calibrate_intervals: bool = True):
        super().__init__()
        self.coverage, self.neighbours, self.calibrate_intervals = coverage, neighbours, calibrate_intervals
        for name in self.resizable_buffers:
            self.register_buffer(name, torch.zeros(0, dtype=FIT_DTYPE))

    def _covariates(self, scores: Tensor) -> Tensor:
        x = scores[:, 1:] if scores.shape[1] > 1 else scores[:, :1]
        return x.to(FIT_DTYPE)

    def fit(self, scores: Tensor, labels: Tensor, **extra: Any) -> SplitPointUQ:
        check_fit_inputs(self, scores, labels)
        if scores.shape[0] < 2:
            raise ShapeError(f"calibrator {self.name!r}: fit needs at least 2 rows of scores "
                             f"[N, 1 + D], got {list(scores.shape)}")
        x = self._covariates(scores.detach())
        center, scale = x.mean(dim=0), x.std(dim=0)
        scale = scale.where(scale > 0, torch.ones_like(scale))
        device = self.residuals.device
        self.center, self.scale = center.to(device), scale.to(device)
        self.covariates = ((x - center) / scale).to(device)
        self.residuals = (labels.detach().to(FIT_DTYPE) - scores[:, 0].detach().to(FIT_DTYPE)).to(device)
        return self

    def neighbour_residuals(self, scores: Tensor) -> Tensor:
        """``[N, K]``: the calibration residuals of each row's ``K = min(neighbours, M)`` nearest
        calibration rows (Euclidean, standardised covariates)."""
        if self.residuals.numel() == 0:
            raise NotFittedError(f"calibrator {self.name!r}: call fit(scores, targets) before calibrating")
        x = self._covariates(scores)
        if x.shape[1] != self.covariates.shape[1]:
            raise ShapeError(f"calibrator {self.name!r}: its input has {x.shape[1]} covariate "
                             f"columns {list(scores.shape)}, but it was fitted on "
                             f"{self.covariates.shape[1]}")
        x = (x - self.center) / self.scale
        k = min(self.neighbours, self.residuals.numel())
        idx = torch.cdist(x, self.covariates).topk(k, dim=1, largest=False).indices
        return self.residuals[idx]

    def forward(self, scores: Tensor) -> Tensor:
        mar, mar_up, mar_down, q_up, q_down = split_point_stats(self.neighbour_residuals(scores),
                                                                self.coverage)
        if self.calibrate_intervals:
            d_up, d_down = interval_factors(mar, mar_up, mar_down)
            q_up, q_down = q_up * d_up, q_down * d_down
        v = scores[:, 0].to(FIT_DTYPE)
        out = torch.stack([v, v - q_down, v + q_up, mar, self_consistency(mar, mar_up, mar_down)], dim=1)
        return out.to(scores.dtype)

    def predict(self, scores: Tensor) -> Tensor:
        """The point predictions ``[N]`` (column 0, unchanged)."""
        return self(scores)[:, 0]

    def predict_proba(self, scores: Tensor) -> Tensor:
        raise TypeError(f"calibrator {self.name!r} calibrates regression, not class probabilities")

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch_size, 2, generator=g)
        y = x[:, 0] + (0.2 + x[:, 1].abs()) * torch.randn(batch_size, generator=g)
        return torch.cat([x[:, :1], x], dim=1), y


CARD = Card(
    name="split_point_uq", kind="calibrator",
    title="Post-Hoc Split-Point Self-Consistency Verification for Efficient, Unified "
          "Quantification of Aleatoric and Epistemic Uncertainty in Deep Learning",
    paper="arXiv:2509.13262",
    summary="Post-hoc regression uncertainty: splits held-out residuals at the prediction, "
            "reads the aleatoric spread and side quantiles from each side, and the epistemic "
            "uncertainty from how far the total MAR is from the harmonic mean of the side MARs.",
    formula="r = y - v; MAR = E|r|, MAR_up = E[r | r > 0], MAR_down = E[-r | r < 0]; "
            "identity: MAR = 2 MAR_up MAR_down / (MAR_up + MAR_down) when v = E[y | x]; "
            "epistemic SDS = |2 MAR_up MAR_down - MAR (MAR_up + MAR_down)|; aleatoric = MAR; "
            "interval [v - q_down d_down, v + q_up d_up], q_up / q_down the coverage (0.95) "
            "quantiles of r | r > 0 and -r | r < 0, d_up = max(1, MAR MAR_down / ((2 MAR_down - "
            "MAR) MAR_up)), d_down symmetric; inputs = 'regression': scores [N, 1 + D] = "
            "(prediction, covariates), labels = targets; output [N, 5] = (v, lower, upper, MAR, SDS)",
    left_out="The paper learns MAR, MAR_up, MAR_down and the side quantiles with small network "
             "heads on the backbone's features (MSE and a coverage-calibration loss); here they "
             "are estimated non-parametrically, by averages over the `neighbours` (50, not from "
             "the paper) nearest calibration rows in standardised covariate space, which needs no "
             "training. The paper's classification variant (SPA calibration of the softmax and "
             "its entropy) and multivariate regression are not implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SplitPointUQ, card=CARD)
