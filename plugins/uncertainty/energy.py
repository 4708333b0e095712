"""Energy score.

Liu, Wang, Owens and Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Gt
from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector
from sdk.ood import energy


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Anomaly score: the free energy ``E(x; T) = -T logsumexp_c(z_c / T)`` (float32)."""
    return energy(logits, temperature)


class Energy(Detector):
    """``score(z) = -T logsumexp(z / T)``; needs no fit."""

    inputs = "logits"

    def __init__(self, temperature: Annotated[float, Gt(0)] = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits: Tensor) -> Tensor:
        return energy_score(logits, self.temperature)


CARD = Card(
    name="energy", kind="detector",
    title="Energy-based Out-of-distribution Detection",
    paper="arXiv:2010.03759",
    summary="The free energy of the logits, -T logsumexp(z / T), already higher for "
            "out-of-distribution inputs (the paper thresholds its negation); T = 1 as the paper.",
    formula="s(x) = E(x; T) = -T log sum_c exp(z_c(x) / T)",
    left_out="Energy-bounded fine-tuning with auxiliary outlier data (the paper's m_in / m_out "
             "hinge loss); only the post-hoc score is implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Energy, card=CARD)
