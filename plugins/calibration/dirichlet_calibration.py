"""Dirichlet calibration: a linear map of the log-probabilities, with ODIR regularisation.

Kull, Perello-Nieto, Kängsepp, Silva Filho, Song, Flach, "Beyond temperature scaling: Obtaining
well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019
(arXiv:1910.12656), sections 3-4 (Dir-ODIR).
"""

from __future__ import annotations

from sdk.calibration import AffineCalibrator, fit_affine
from sdk.card import Card
from sdk.hookspecs import hookimpl

__all__ = ["CARD", "DirichletCalibration", "fit_affine"]


class DirichletCalibration(AffineCalibrator):
    """``q = softmax(W log p + b)``, fitted as multinomial logistic regression on ``log p``
    with the off-diagonal / intercept penalties, from ``W = I, b = 0`` (``q = p``)."""

    inputs = "probabilities"
    full = True


CARD = Card(
    name="dirichlet_calibration", kind="calibrator",
    title="Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with "
          "Dirichlet calibration",
    paper="arXiv:1910.12656",
    summary="Calibrates probabilities with softmax(W log p + b), the canonical parametrisation "
            "of a Dirichlet class-conditional model; reg_lambda / reg_mu > 0 give Dir-ODIR.",
    formula="q = softmax(W ln p + b); (W, b) = argmin mean_i -log q_{i, y_i} "
            "+ lambda/(C(C-1)) sum_{j != k} W_jk^2 + mu/C sum_j b_j^2, from W = I, b = 0; "
            "ln p clamped at ln 1e-12",
    left_out="lambda and mu chosen by cross-validation in the paper (no default given; 0 / 0 "
             "here, the reference code's default, is unregularised Dirichlet calibration); "
             "Dir-L2 (an L2 on every weight) and the diagonal / fixed-diagonal variants.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DirichletCalibration, card=CARD)
