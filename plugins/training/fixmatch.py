"""FixMatch: hard pseudo-labels from a weakly augmented view, kept above a confidence
threshold, as cross-entropy targets for a strongly augmented view of the same unlabelled
sample (the objective is :class:`sdk.semisup.FixMatch`, which ``shrinkmatch`` extends).

Sohn, Berthelot, Li, Zhang, Carlini, Cubuk, Kurakin, Zhang & Raffel, "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence", NeurIPS 2020 (arXiv:2001.07685),
eq. 2-4; tau = 0.95, lambda_u = 1, mu = 7 (Sec. 4).
"""

from __future__ import annotations

from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.semisup import FixMatch, masked_cross_entropy, pseudo_labels

__all__ = ["FixMatch", "fixmatch_loss"]


def fixmatch_loss(logits: Tensor, targets: Tensor, weak: Tensor, strong: Tensor, *,
                  threshold: float = 0.95, unlabeled_weight: float = 1.0) -> Tensor:
    """``CE(logits, targets) + lambda_u * mean_i [max p_weak_i >= tau] CE(strong_i, q_i)``,
    ``q_i = argmax p_weak_i`` without gradient, averaged over all unlabelled rows."""
    from torch.nn.functional import cross_entropy

    confidence, labels = pseudo_labels(weak)
    mask = (confidence >= threshold).float()
    return cross_entropy(logits, targets) + unlabeled_weight * masked_cross_entropy(
        strong, labels, mask)


CARD = Card(
    name="fixmatch", kind="objective",
    title="FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence",
    paper="arXiv:2001.07685",
    summary="Semi-supervised: the labelled cross-entropy plus, on unlabelled samples, the "
            "cross-entropy of the strong view against the weak view's hard pseudo-label where "
            "its confidence reaches tau. Needs Trainer(unlabeled_transforms=(weak, strong)) and "
            "fit(..., unlabeled=loader); mu is the loaders' batch-size ratio (7 in the paper).",
    formula="L = (1/B) sum_b CE(y_b, p(x_b)) + lambda_u (1/(mu B)) sum_i 1[max q_i >= tau_i] "
            "CE(argmax q_i, p(A(u_i))), q_i = softmax(z(alpha(u_i))) without gradient; tau_i = tau "
            "(fixed), class_thresholds[argmax q_i] (per class) or FlexMatch's "
            "M(beta_c) tau, M(x) = x / (2 - x) (curriculum=True)",
    left_out="The backbone (WideResNet-28-2), RandAugment/CTAugment, the EMA model used for "
             "evaluation, SGD with Nesterov momentum and the cosine LR decay are the recipe's: "
             "sdk.data's tensor augmentations serve as weak and strong views. The labelled and "
             "unlabelled batches are encoded in separate forwards (the authors' code "
             "concatenates them, which differs for batch-norm statistics). class_thresholds and "
             "curriculum (FlexMatch, arXiv:2110.08263) are extensions, off by default; no "
             "Loss.per_sample (the unlabelled term has mu B rows), so no reweighter.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FixMatch, card=CARD)
