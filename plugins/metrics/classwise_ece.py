"""Classwise expected calibration error.

Kull, Perello-Nieto, Kängsepp, Silva Filho, Song, Flach, "Beyond temperature scaling: Obtaining
well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS 2019
(arXiv:1910.12656). Implementation in :mod:`sdk.metrics`; this module registers its streaming
form (per-class, per-bin sums).
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import ClasswiseECE, classwise_bins, classwise_ece

__all__ = ["CARD", "ClasswiseECE", "classwise_bins", "classwise_ece"]

CARD = Card(
    name="classwise_ece", kind="metric",
    title="Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with "
          "Dirichlet calibration",
    paper="arXiv:1910.12656",
    summary="Mean over classes of the binned calibration error of each class probability p_c "
            "against the indicator [y = c]; calibration of the whole vector, not only the top "
            "label.",
    formula="cwECE = 1/C sum_c sum_b |B_cb|/N * |mean_{B_cb} [y = c] - mean_{B_cb} p_c|, "
            "B_cb = {i : p_ic in ((b-1)/M, b/M]} (p = 0 in B_c1), M = 15",
    left_out="The reference code's binning (np.digitize on linspace(0, 1, M): M-1 left-closed "
             "bins plus one for p = 1); the same M right-closed bins as ece are used instead.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ClasswiseECE, card=CARD)
