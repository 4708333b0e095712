"""Discrete-time survival: the negative log-likelihood of per-bin hazards, with censoring.

The survival objective of "Ad Creative Discontinuation Prediction with Multi-Modal Multi-Task
Neural Survival Networks" (Kitada, Iyatomi & Seki, 2022, arXiv:2204.11588): a network
predicts the hazard ``h_t = sigmoid(a_t)`` of each time bin; a sample whose event (or
censoring) falls in bin ``T_i`` with event flag ``d_i`` has likelihood
``prod_{t < T_i} (1 - h_t) * h_{T_i}^{d_i} (1 - h_{T_i})^{1 - d_i}``. :func:`concordance_index`
is Harrell's C-index of the risk ``1 - prod_{t <= tau} (1 - h_t)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdk import classification as cls
from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

EVENT = "event"
"""``Batch.extras[EVENT]``: 1 where the sample's event was observed in its bin, 0 if censored [B]."""


def hazard_nll(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-[sum_{t < T} log(1 - h_t) + d log h_T + (1 - d) log(1 - h_T)]`` [B],
    ``h = sigmoid(a)`` (log-sigmoids: no clamping)."""
    a = cls.upcast(logits)
    survive = F.logsigmoid(-a)
    before = torch.arange(a.shape[1], device=a.device)[None, :] < bins[:, None]
    a_t = a.gather(-1, bins[:, None]).squeeze(-1)
    d = event.to(a.dtype)
    last = d * F.logsigmoid(a_t) + (1 - d) * F.logsigmoid(-a_t)
    return -(torch.where(before, survive, 0.0).sum(-1) + last)


def risk(logits: torch.Tensor, horizon: int | None = None) -> torch.Tensor:
    """``1 - prod_{t <= horizon} (1 - h_t)`` [B]: the probability of the event by bin ``horizon``
    (the last bin when None)."""
    a = cls.upcast(logits)
    end = a.shape[1] if horizon is None else horizon + 1
    return -torch.expm1(F.logsigmoid(-a[:, :end]).sum(-1))


def concordance_index(risk_score: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Harrell's C: over pairs ``(i, j)`` with ``T_i < T_j`` and ``d_i = 1`` (comparable), the
    share with ``risk_i > risk_j`` (ties 1/2). An [N, N] comparison (for evaluation sets)."""
    comparable = (bins[:, None] < bins[None, :]) & event.bool()[:, None]
    diff = risk_score[:, None] - risk_score[None, :]
    score = (diff > 0).to(risk_score.dtype) + 0.5 * (diff == 0).to(risk_score.dtype)
    return (score * comparable).sum() / comparable.sum().clamp_min(1)


class DiscreteHazardSurvival(Objective):
    """The hazard NLL of ``Views.logits`` [B, T] (one hazard logit per time bin) against the
    bins ``Batch.targets`` [B] (class ids in ``[0, T)``) and ``Batch.extras["event"]`` [B]
    (1 observed, 0 censored)."""

    requires = {"logits": True, "targets": True, "extras": (EVENT,)}
    consumes = frozenset()
    batch_coupled = False

    def forward(self, views: Views, batch: Batch) -> Loss:
        z, bins = views.logits, batch.targets
        t = cls.targets("discrete_hazard_survival", z, bins, soft=False)
        event = batch.extras[EVENT]
        if not isinstance(event, torch.Tensor) or event.shape != (z.shape[0],) or event.is_complex():
            got = (f"{event.dtype} {list(event.shape)}" if isinstance(event, torch.Tensor)
                   else type(event).__name__)
            raise ShapeError(f"discrete_hazard_survival: Batch.extras['event'] must be event flags "
                             f"[{z.shape[0]}] (1 observed, 0 censored), got {got}")
        per_sample = hazard_nll(z, t.ids, event)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = torch.randn(batch_size, 6, generator=generator).requires_grad_()
        bins = torch.randint(0, 6, (batch_size,), generator=generator)
        event = (torch.rand(batch_size, generator=generator) < 0.7).float()
        return Views(logits=logits), Batch(targets=bins, extras={EVENT: event})


CARD = Card(
    name="discrete_hazard_survival", kind="objective",
    title="Ad Creative Discontinuation Prediction with Multi-Modal Multi-Task Neural Survival Networks",
    paper="arXiv:2204.11588",
    summary="Discrete-time survival: sigmoid hazards per time bin trained by the censored "
            "negative log-likelihood; risk and Harrell's C-index for evaluation.",
    formula="h_t = sigmoid(a_t); L_i = -[sum_{t < T_i} log(1 - h_t) + d_i log h_{T_i} + "
            "(1 - d_i) log(1 - h_{T_i})]; risk = 1 - prod_{t <= tau} (1 - h_t)",
    left_out="Formula from the catalogue's reconstruction (the standard discrete-time hazard "
             "likelihood), not checked against the paper: its multi-task split into "
             "short-term and long-term hazard heads, the CTR sample weights (use a reweighter), "
             "the multi-modal ad encoders and data are not implemented. Censoring counts the "
             "censored bin as survived. The C-index is a function of this module "
             "(concordance_index), not a registered metric yet.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DiscreteHazardSurvival, card=CARD)
