"""Equal-mass (adaptive) expected calibration error of the top-label confidence.

Nixon, Dusenberry, Zhang, Jerfel, Tran, "Measuring Calibration in Deep Learning", CVPR
Workshops 2019 (arXiv:1904.01685); AdaECE of Mukhoti et al., NeurIPS 2020 (arXiv:2002.09437).
Implementation in :mod:`sdk.metrics`; this module registers its streaming form.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import AdaptiveECE, adaptive_ece

__all__ = ["CARD", "AdaptiveECE", "adaptive_ece"]

CARD = Card(
    name="adaptive_ece", kind="metric",
    title="Measuring Calibration in Deep Learning", paper="arXiv:1904.01685",
    summary="ECE over bins holding equal numbers of samples (15 by default), which keeps every "
            "bin populated where confidences cluster near 1; streaming with O(fine_bins) state.",
    formula="confidences sorted, split into M bins of equal count (numpy.array_split); "
            "aECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|; streamed as per-fine-bin sums over "
            "F = 10000 equal-width right-closed bins (c = 0 in the first, c = 1 in the last), each "
            "fine bin joining the equal-mass bin of its middle rank",
    left_out="Exact equal-mass bins need every confidence in memory; the streaming form orders "
             "confidences to 1/F only: fine bins an equal-mass boundary cuts are assigned whole, "
             "so the value can differ from the exact one by at most 2 * (rows in cut fine bins) / N, "
             "which error_bound() returns (tested). Nixon et al.'s ACE is classwise over all "
             "classes; this is the top-label form (AdaECE).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AdaptiveECE, card=CARD)
