"""Linear-probe accuracy: multinomial logistic regression on frozen embeddings, fitted by L-BFGS.

The linear-probe protocol of Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021 (arXiv:2103.00020), Appendix A.3 (L2-regularised logistic
regression, L-BFGS, at most 1000 iterations), trained in torch. Implementation in
:mod:`sdk.metrics`; this module registers its streaming form.
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import LinearProbe, fit_linear_probe, linear_probe_accuracy

__all__ = ["CARD", "LinearProbe", "fit_linear_probe", "linear_probe_accuracy"]

CARD = Card(
    name="linear_probe", kind="metric",
    title="Learning Transferable Visual Models From Natural Language Supervision (linear probe)",
    paper="arXiv:2103.00020",
    summary="Test accuracy of a multinomial logistic regression trained with full-batch L-BFGS "
            "on standardised frozen training embeddings (zero init, deterministic).",
    formula="x' = (x - mean_train) / std_train; min_{W,b} 1/N sum_i CE(W x'_i + b, y_i) "
            "+ weight_decay/2 ||W||_F^2 (= scikit-learn C = 1/(weight_decay N)); "
            "acc = mean_test [argmax(W x' + b) = y]",
    left_out="The paper's sweep of the L2 strength on a validation split (a fixed weight_decay "
             "is used); feature standardisation is added.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LinearProbe, card=CARD)
