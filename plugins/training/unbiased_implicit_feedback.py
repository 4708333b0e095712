"""Unbiased pointwise learning from missing-not-at-random implicit feedback: a click is exposure
times relevance, ``Y = O R``, and weighting the click by the inverse exposure propensity makes the
pointwise loss an unbiased estimate of the loss on the (unobserved) relevance.

Saito, Yaginuma, Nishino, Sakata & Nakata, "Unbiased Recommender Learning from
Missing-Not-At-Random Implicit Feedback", WSDM 2020 (arXiv:1909.03601): the ideal loss (eq. 3),
the unbiased estimator (eq. 5, Rel-MF), its clipped variant (eq. 9) and the item-popularity
propensity of the experiments.
"""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
import torch.nn.functional as F
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def popularity_propensity(item_clicks: Tensor, eta: float = 0.5) -> Tensor:
    """Per-item exposure propensity ``(n_i / max_j n_j)^eta`` from the items' click counts
    ``n`` ``[I]`` (the paper's experiments: eta = 0.5)."""
    n = item_clicks.double()
    return (n / n.max().clamp_min(1)) ** eta


def unbiased_pointwise_loss(scores: Tensor, clicks: Tensor, propensity: Tensor,
                            clip: float = 0.1) -> Tensor:
    """Per pair ``(Y / theta) d1(s) + (1 - Y / theta) d0(s)``, ``d1 = -log sigmoid(s)``,
    ``d0 = -log(1 - sigmoid(s))``, ``theta = max(propensity, clip)`` (``clip = 0``: unbiased)."""
    s = scores.float()
    ratio = clicks.float() / propensity.float().clamp_min(clip)
    return ratio * F.softplus(-s) + (1 - ratio) * F.softplus(s)


class UnbiasedImplicitFeedback(Objective):
    """The clipped unbiased estimator on scores ``Views.logits`` ``[B]`` or ``[B, 1]`` (one
    (user, item) pair per row), clicks ``Batch.targets`` (0/1) and exposure propensities
    ``Batch.extras["propensity"]`` ``[B]`` in ``(0, 1]`` (e.g. :func:`popularity_propensity`
    of the pair's item). Per pair, so ``per_sample`` is the estimator's terms; their mean is the
    loss."""

    requires = {"logits": True, "targets": True, "extras": (keys.PROPENSITY,)}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = False

    def __init__(self, clip: Annotated[float, annotated_types.Interval(ge=0, le=1)] = 0.1):
        super().__init__()
        self.clip = clip

    def forward(self, views: Views, batch: Batch) -> Loss:
        s = views.logits
        if s.dim() == 2 and s.shape[1] == 1:
            s = s[:, 0]
        if s.dim() != 1:
            raise ShapeError(f"objective 'unbiased_implicit_feedback': Views.logits must be one score "
                             f"per pair, [B] or [B, 1], got {list(views.logits.shape)}")
        theta = batch.extras.get(keys.PROPENSITY, views.extras.get(keys.PROPENSITY))
        if theta is None:
            raise RequirementError("objective 'unbiased_implicit_feedback' needs "
                                   f"Batch.extras[{keys.PROPENSITY!r}]")
        for field, x in (("targets", batch.targets), (f"extras[{keys.PROPENSITY!r}]", theta)):
            if x.shape != s.shape:
                raise ShapeError(f"objective 'unbiased_implicit_feedback': Batch.{field} must be "
                                 f"[{s.shape[0]}], got {list(x.shape)}")
        if not theta.is_floating_point():
            raise ShapeError("objective 'unbiased_implicit_feedback': propensities must be floating "
                             f"point in (0, 1], got {theta.dtype}")
        per_sample = unbiased_pointwise_loss(s, batch.targets, theta, self.clip)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: scores, clicks and propensities."""
        scores = torch.randn(batch_size, generator=generator).requires_grad_()
        clicks = (torch.rand(batch_size, generator=generator) < 0.3).float()
        theta = 0.05 + 0.95 * torch.rand(batch_size, generator=generator)
        return Views(logits=scores[:, None]), Batch(targets=clicks, extras={keys.PROPENSITY: theta})


CARD = Card(
    name="unbiased_implicit_feedback", kind="objective",
    title="Unbiased Recommender Learning from Missing-Not-At-Random Implicit Feedback",
    paper="arXiv:1909.03601",
    summary="Rel-MF's pointwise loss: clicks weighted by inverse exposure propensities (clipped "
            "at M) estimate the loss on true relevance without the popularity bias of naive "
            "click-as-label training.",
    formula="l_ui = (Y_ui / theta_ui) d1(s_ui) + (1 - Y_ui / theta_ui) d0(s_ui), "
            "d1 = -log sigmoid(s), d0 = -log(1 - sigmoid(s)), theta <- max(theta, M); "
            "E_O[l_ui] = R_ui d1 + (1 - R_ui) d0 for M = 0; popularity propensity "
            "theta_*i = (n_i / max_j n_j)^eta",
    left_out="The matrix-factorisation model itself (any encoder scoring a (user, item) row) and "
             "the paper's reweighter view: the estimator is not a weight on one per-pair loss "
             "(a clicked pair mixes d1 and d0), so it is an objective only. The propensity "
             "estimate is given in Batch.extras (popularity_propensity computes the paper's).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(UnbiasedImplicitFeedback, card=CARD)
