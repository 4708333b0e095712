"""Area under the risk-coverage curve of selective classification by top-label confidence.

Geifman, Uziel, El-Yaniv, "Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers",
ICLR 2019 (arXiv:1805.08206). Implementation in :mod:`sdk.metrics`; this module registers its
streaming form.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import AURC, aurc

__all__ = ["CARD", "AURC", "aurc"]

CARD = Card(
    name="aurc", kind="metric",
    title="Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers", paper="arXiv:1805.08206",
    summary="Mean selective risk over all coverages when abstaining on the least confident rows "
            "first (lower is better); streaming with O(fine_bins) state.",
    formula="rows by decreasing confidence max_c p_c; AURC = 1/N sum_{k=1}^N risk(k), risk(k) = "
            "errors among the k most confident / k; rows of one fine bin (F = 10000) taken in "
            "random order: each bin contributes E_a (H(a+c) - H(a)) + e/c (c - a (H(a+c) - H(a)))",
    left_out="E-AURC (minus the AURC of an oracle ranking); confidences are ordered to 1/F: the "
             "distance to the exact AURC under any order of rows within a fine bin is at most "
             "1/N sum_bins min(e, c - e) (H(a+c) - H(a)), returned by error_bound() (tested).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AURC, card=CARD)
