"""Multi-class Brier score.

Brier, "Verification of Forecasts Expressed in Terms of Probability", Monthly Weather Review
78(1), 1950. Implementation in :mod:`sdk.metrics`; this module registers its streaming form.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import Brier, brier

__all__ = ["CARD", "Brier", "brier"]

CARD = Card(
    name="brier", kind="metric",
    title="Verification of Forecasts Expressed in Terms of Probability",
    paper="https://doi.org/10.1175/1520-0493(1950)078<0001:VOFEIT>2.0.CO;2",
    summary="Mean over samples of the squared distance between the probability vector and the "
            "one-hot label, summed over classes (range [0, 2]; not halved, not divided by C).",
    formula="BS = 1/N sum_i sum_c (p_ic - [y_i = c])^2",
    left_out="Brier's decomposition into reliability/resolution; soft targets.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Brier, card=CARD)
