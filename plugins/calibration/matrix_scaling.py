"""Matrix scaling of logits with the off-diagonal and intercept regularisation (ODIR).

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (arXiv:1706.04599), and
Kull, Perello-Nieto, Kängsepp, Silva Filho, Song, Flach, "Beyond temperature scaling: Obtaining
well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019
(arXiv:1910.12656), section 4 (MS-ODIR).
"""

from __future__ import annotations

from sdk.calibration import AffineCalibrator, fit_affine
from sdk.card import Card
from sdk.hookspecs import hookimpl

__all__ = ["CARD", "MatrixScaling", "fit_affine"]


class MatrixScaling(AffineCalibrator):
    """``z' = W z + b`` fitted on the NLL plus ``lambda`` times the mean squared off-diagonal
    weight and ``mu`` times the mean squared bias, from ``W = I, b = 0``."""

    inputs = "logits"
    full = True


CARD = Card(
    name="matrix_scaling", kind="calibrator",
    title="Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with "
          "Dirichlet calibration",
    paper="arXiv:1910.12656",
    summary="A full linear map of the logits (C^2 + C parameters) fitted by NLL; reg_lambda / "
            "reg_mu > 0 give Kull et al.'s MS-ODIR (off-diagonal and intercept regularisation), "
            "0 / 0 Guo et al.'s plain matrix scaling.",
    formula="z' = W z + b; (W, b) = argmin mean_i -log softmax(W z_i + b)_{y_i} "
            "+ lambda/(C(C-1)) sum_{j != k} W_jk^2 + mu/C sum_j b_j^2, from W = I, b = 0",
    left_out="The paper picks lambda and mu by 5-fold cross-validation over a grid per data set; "
             "no value is given as a default, so the defaults 0 / 0 are unregularised matrix "
             "scaling (Guo et al. 2017) and the grid search is left to the user.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MatrixScaling, card=CARD)
