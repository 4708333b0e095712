"""Vector scaling: a per-class scale and bias of the logits fitted on held-out data by NLL.

Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
(arXiv:1706.04599), section 4.2 (the diagonal case of matrix scaling).
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge

from sdk.calibration import AffineCalibrator, fit_affine
from sdk.card import Card
from sdk.hookspecs import hookimpl

__all__ = ["CARD", "VectorScaling", "fit_affine"]


class VectorScaling(AffineCalibrator):
    """``z' = w * z + b`` (``w, b`` in R^C), from ``w = 1, b = 0`` by full-batch L-BFGS on the NLL."""

    inputs = "logits"
    full = False

    def __init__(self, max_iter: Annotated[int, Ge(1)] = 500):
        super().__init__(0.0, 0.0, max_iter)


CARD = Card(
    name="vector_scaling", kind="calibrator",
    title="On Calibration of Modern Neural Networks", paper="arXiv:1706.04599",
    summary="Scales each class logit and adds a per-class bias (2C parameters) fitted by NLL "
            "on held-out data; may change the argmax, unlike temperature scaling.",
    formula="z' = w ⊙ z + b; (w, b) = argmin mean_i -log softmax(w ⊙ z_i + b)_{y_i}, from "
            "w = 1, b = 0 (full-batch L-BFGS, strong Wolfe, float64)",
    left_out="The paper optimises with its own optimiser settings; here L-BFGS to a gradient "
             "tolerance of 1e-9 or max_iter iterations. No regularisation (as the paper).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VectorScaling, card=CARD)
