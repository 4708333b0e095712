"""Out-of-distribution detection metrics: AUROC, AUPR-in, AUPR-out and FPR at 95% TPR.

The evaluation protocol of Hendrycks and Gimpel (ICLR 2017) and Liang et al. (ICLR 2018).
Implementations live in :mod:`sdk.metrics`; this module registers their streaming forms.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import AUROC, AUPRIn, AUPROut, FPRAtTPR, aupr_in, aupr_out, auroc, fpr_at_tpr

__all__ = ["AUROC", "AUPRIn", "AUPROut", "FPRAtTPR", "auroc", "aupr_in", "aupr_out", "fpr_at_tpr"]

_TITLE = "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in Neural Networks"
_KEPT = ("Keeps every score until compute() (a ranking has no fixed-size sufficient statistic); "
         "no binned approximation.")

AUROC_CARD = Card(
    name="auroc", kind="metric", title=_TITLE, paper="arXiv:1610.02136",
    summary="Area under the ROC curve of anomaly scores, out-of-distribution rows positive "
            "(update(scores, is_ood)); ties count one half, as scikit-learn's roc_auc_score.",
    formula="AUROC = P(s_out > s_in) + 1/2 P(s_out = s_in)",
    left_out=_KEPT,
)

AUPR_IN_CARD = Card(
    name="aupr_in", kind="metric", title=_TITLE, paper="arXiv:1610.02136",
    summary="Average precision with in-distribution rows positive, ranked by -score; equals "
            "scikit-learn's average_precision_score(1 - is_ood, -scores).",
    formula="AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds of -s",
    left_out=_KEPT + " Interpolated (trapezoidal) PR areas.",
)

AUPR_OUT_CARD = Card(
    name="aupr_out", kind="metric", title=_TITLE, paper="arXiv:1610.02136",
    summary="Average precision with out-of-distribution rows positive, ranked by the score; "
            "equals scikit-learn's average_precision_score(is_ood, scores).",
    formula="AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds of s",
    left_out=_KEPT + " Interpolated (trapezoidal) PR areas.",
)

FPR_CARD = Card(
    name="fpr_at_tpr", kind="metric",
    title="Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks",
    paper="arXiv:1706.02690",
    summary="FPR95: the fraction of out-of-distribution rows accepted at the lowest threshold "
            "that accepts at least 95% of the in-distribution rows (in-distribution positive).",
    formula="t* = min {t : P(s_in <= t) >= tpr}; FPR = P(s_out <= t*) (over distinct thresholds)",
    left_out=_KEPT + " Hendrycks et al.'s variant that picks the recall closest to 95%.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AUROC, card=AUROC_CARD)
    registry.add(AUPRIn, card=AUPR_IN_CARD)
    registry.add(AUPROut, card=AUPR_OUT_CARD)
    registry.add(FPRAtTPR, card=FPR_CARD)
