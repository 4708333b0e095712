"""Basic prediction metrics: top-1 accuracy and negative log-likelihood (the logarithmic score).

Good, "Rational Decisions", Journal of the Royal Statistical Society B 14(1), 1952 (the
logarithmic scoring rule). Implementations live in :mod:`sdk.metrics`; this module registers
their streaming forms as metric plugins.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import NLL, Accuracy, accuracy, nll

__all__ = ["ACCURACY_CARD", "NLL_CARD", "Accuracy", "NLL", "accuracy", "nll"]

ACCURACY_CARD = Card(
    name="accuracy", kind="metric",
    title="Top-1 classification accuracy",
    paper="https://scikit-learn.org/stable/modules/model_evaluation.html#accuracy-score",
    summary="Fraction of samples whose highest-scoring class (logits or probabilities) is the "
            "label; streaming update(scores, labels) / compute().",
    formula="acc = 1/N sum_i [argmax_c s_ic = y_i]",
    left_out="Top-k accuracy, soft or multi-label targets, sample weights.",
)

NLL_CARD = Card(
    name="nll", kind="metric",
    title="Rational Decisions (the logarithmic score)",
    paper="https://doi.org/10.1111/j.2517-6161.1952.tb00104.x",
    summary="Mean negative log-probability of the true class; probabilities below the dtype's "
            "machine epsilon are clipped to it (as scikit-learn's log_loss).",
    formula="NLL = -1/N sum_i log max(p_{i,y_i}, eps)",
    left_out="Soft or multi-label targets, sample weights.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Accuracy, card=ACCURACY_CARD)
    registry.add(NLL, card=NLL_CARD)
