"""Expected and maximum calibration error of the top-label confidence.

Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural Networks", ICML 2017
(arXiv:1706.04599), following Naeini et al. (AAAI 2015). Implementations in :mod:`sdk.metrics`;
this module registers their streaming forms (constant memory: per-bin sums).
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import ECE, MCE, calibration_bins, ece, mce

__all__ = ["ECE_CARD", "MCE_CARD", "ECE", "MCE", "calibration_bins", "ece", "mce"]

_BINS = ("Confidence c_i = max_c p_ic, prediction argmax; M equal-width bins "
         "B_b = ((b-1)/M, b/M] (right-closed as in the paper's reference code, c = 0 in B_1)")

ECE_CARD = Card(
    name="ece", kind="metric",
    title="On Calibration of Modern Neural Networks", paper="arXiv:1706.04599",
    summary="Expected calibration error: bin-size-weighted mean gap between accuracy and mean "
            "confidence over equal-width confidence bins (15 by default, as in the paper).",
    formula=f"{_BINS}; ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|",
    left_out="Equal-mass (adaptive) bins, L2 / debiased variants, bin edges other than "
             "right-closed (netcal uses left-closed bins).",
)

MCE_CARD = Card(
    name="mce", kind="metric",
    title="On Calibration of Modern Neural Networks", paper="arXiv:1706.04599",
    summary="Maximum calibration error: the largest gap between accuracy and mean confidence "
            "over the non-empty equal-width confidence bins.",
    formula=f"{_BINS}; MCE = max_(b: |B_b| > 0) |acc(B_b) - conf(B_b)|",
    left_out="Equal-mass (adaptive) bins.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ECE, card=ECE_CARD)
    registry.add(MCE, card=MCE_CARD)
