"""Maximum softmax probability, the baseline detector.

Hendrycks and Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
in Neural Networks", ICLR 2017.
"""

from __future__ import annotations

from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector
from sdk.ood import max_softmax


def msp_score(logits: Tensor) -> Tensor:
    """Anomaly score ``-max_c softmax(z)_c`` (float32)."""
    return -max_softmax(logits)


class MSP(Detector):
    """``score(z) = -max_c softmax(z)_c``; needs no fit."""

    inputs = "logits"

    def forward(self, logits: Tensor) -> Tensor:
        return msp_score(logits)


CARD = Card(
    name="msp", kind="detector",
    title="A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural Networks",
    paper="arXiv:1610.02136",
    summary="The classifier's maximum softmax probability as confidence; negated so that higher "
            "means more anomalous.",
    formula="s(x) = -max_c softmax(z(x))_c",
    left_out="The paper's abnormality module (an auxiliary decoder) and its misclassification "
             "experiments; only the softmax baseline is implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MSP, card=CARD)
