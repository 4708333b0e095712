"""Maximum logit.

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt and Song, "Scaling
Out-of-Distribution Detection for Real-World Settings", ICML 2022.
"""

from __future__ import annotations

from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector


def max_logit_score(logits: Tensor) -> Tensor:
    """Anomaly score ``-max_c z_c`` (float32)."""
    return -logits.float().amax(-1)


class MaxLogit(Detector):
    """``score(z) = -max_c z_c``; needs no fit."""

    inputs = "logits"

    def forward(self, logits: Tensor) -> Tensor:
        return max_logit_score(logits)


CARD = Card(
    name="max_logit", kind="detector",
    title="Scaling Out-of-Distribution Detection for Real-World Settings",
    paper="arXiv:1911.11132",
    summary="The largest unnormalised logit as confidence (MaxLogit); negated so that higher "
            "means more anomalous.",
    formula="s(x) = -max_c z_c(x)",
    left_out="The paper's multi-label and segmentation (StreetHazards) settings and its "
             "KL-matching detector.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MaxLogit, card=CARD)
