"""ShrinkMatch: FixMatch's confident samples, plus the uncertain ones in a shrunk class space
where the classes that confuse their top-1 class are removed until it is confident.

Yang, Zhao, Qi, Qiao, Shi & Zhao, "Shrinking Class Space for Enhanced Certainty in
Semi-Supervised Learning", ICCV 2023 (arXiv:2308.06777), Sec. 3.2-3.3, checked against the
authors' TorchSSL code (the SVHN setting: FixMatch without distribution alignment).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk.card import Card
from sdk.classification import upcast
from sdk.hookspecs import hookimpl
from sdk.semisup import FixMatch, masked_cross_entropy


def shrunk_space_loss(weak: Tensor, strong: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Per-sample shrunk-space loss ``[U]`` and whether each sample reached the threshold there.

    Rank the classes by the weak logits ``s_(0) >= s_(1) >= ...``. For an uncertain sample
    (``conf = max softmax(weak) < tau``) remove the ranks ``1 .. c-1`` for the smallest
    ``c`` in ``2 .. C-1`` at which the top-1 class's confidence among the remaining classes,
    ``softmax(s_(0), s_(c), ..., s_(C-1))_0``, reaches ``tau``; its loss is ``conf`` times the
    cross-entropy of the strong logits restricted to those classes with the top-1 class as
    target; 0 when even ``c = C-1`` stays below ``tau``, for confident samples, and for
    ``C < 3``. The weak view gives no gradient."""
    w = upcast(weak.detach())
    s = upcast(strong)
    u, c = w.shape
    confidence = w.softmax(-1).max(-1).values
    if c < 3:
        zero = s.sum(-1) * 0
        return zero, torch.zeros(u, dtype=torch.bool, device=w.device)
    ranked, order = w.sort(-1, descending=True)
    s = s.gather(-1, order)
    # tail[:, k] = logsumexp(ranked[:, k:]); candidates c = 2 .. C-1
    tail = ranked.flip(-1).logcumsumexp(-1).flip(-1)[:, 2:]
    top = ranked[:, :1]
    sub = torch.exp(top - torch.logaddexp(top, tail))  # [U, C-2]
    ok = sub >= threshold
    reached = ok.any(-1) & (confidence < threshold)
    first = ok.float().argmax(-1) + 2  # the first c that reaches tau (2 when none: weight 0)
    rank = torch.arange(c, device=w.device)
    keep = (rank == 0) | (rank >= first[:, None])
    ce = s.masked_fill(~keep, float("-inf")).logsumexp(-1) - s[:, 0]
    return torch.where(reached, confidence * ce, 0.0), reached


class ShrinkMatch(FixMatch):
    """:class:`sdk.semisup.FixMatch` whose unlabelled term adds ``shrink_weight`` times the
    mean over all ``U`` unlabelled samples of :func:`shrunk_space_loss`."""

    def __init__(self, threshold: Annotated[float, Interval(ge=0, le=1)] = 0.95,
                 unlabeled_weight: Annotated[float, Ge(0)] = 1.0,
                 shrink_weight: Annotated[float, Ge(0)] = 1.0):
        super().__init__(threshold=threshold, unlabeled_weight=unlabeled_weight)
        self.shrink_weight = shrink_weight

    def unlabeled_loss(self, weak: Tensor, strong: Tensor, confidence: Tensor, labels: Tensor,
                       mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        shrunk, reached = shrunk_space_loss(weak, strong, self.tau)
        shrink = shrunk.mean()
        value = masked_cross_entropy(strong, labels, mask) + self.shrink_weight * shrink
        return value, {"shrink": shrink.detach(), "shrunk_rate": reached.float().mean()}


CARD = Card(
    name="shrinkmatch", kind="objective",
    title="Shrinking Class Space for Enhanced Certainty in Semi-Supervised Learning",
    paper="arXiv:2308.06777",
    summary="FixMatch plus the uncertain unlabelled samples: for each, the classes ranked just "
            "below its top-1 prediction are removed until the top-1 confidence in the shrunk "
            "class space reaches tau, and the strong view is trained to predict the top-1 class "
            "there, weighted by the original confidence.",
    formula="L = L_s + lambda_u (L_fixmatch + lambda_shrink (1/U) sum_{i: conf_i < tau} "
            "1[conf'_i >= tau] conf_i CE_{S_i}(0, p(A(u_i)))), S_i = {rank 0} + {ranks >= c_i}, "
            "c_i = min{c in 2..C-1: conf'_i(c) = softmax(s_(0), s_(c), ..., s_(C-1))_0 >= tau}",
    left_out="The shrunk-space loss is applied to the encoder's logits: the authors train it "
             "through an auxiliary classifier head (their logits_aux), which an objective fed "
             "only logits does not have. The combination weight lambda_shrink = 1 (the paper's "
             "sum of the two unlabelled terms) is a parameter. Distribution alignment (their "
             "CIFAR/STL baseline) and the backbone, augmentations and EMA evaluation are left "
             "to the recipe; mu is the loaders' batch-size ratio.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ShrinkMatch, card=CARD)
