"""Coverage and mean size of prediction sets (conformal prediction's two measures).

Angelopoulos, Bates, Malik, Jordan, "Uncertainty Sets for Image Classifiers using Conformal
Prediction", ICLR 2021 (arXiv:2009.14193). Implementations in :mod:`sdk.metrics`.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import SetCoverage, SetSize, set_coverage, set_size

__all__ = ["COVERAGE_CARD", "SIZE_CARD", "SetCoverage", "SetSize", "set_coverage", "set_size"]

_TITLE = "Uncertainty Sets for Image Classifiers using Conformal Prediction"
_LEFT = "Size-stratified and class-conditional coverage. Sets are boolean [N, C] masks."

COVERAGE_CARD = Card(
    name="set_coverage", kind="metric", title=_TITLE, paper="arXiv:2009.14193",
    summary="Fraction of rows whose prediction set holds the true class (marginal coverage).",
    formula="coverage = 1/N sum_i [y_i in C(x_i)]", left_out=_LEFT,
)

SIZE_CARD = Card(
    name="set_size", kind="metric", title=_TITLE, paper="arXiv:2009.14193",
    summary="Mean number of classes per prediction set (lower is more informative at equal "
            "coverage).",
    formula="size = 1/N sum_i |C(x_i)|", left_out=_LEFT,
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SetCoverage, card=COVERAGE_CARD)
    registry.add(SetSize, card=SIZE_CARD)
