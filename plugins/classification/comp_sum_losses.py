"""Comp-sum losses: Phi^tau applied to sum_y' exp(h_y' - h_y) = 1 / p_y, one family from the sum-exp
loss (tau = 0) through cross-entropy (tau = 1) and generalised cross-entropy to MAE (tau = 2).

Mao, Mohri & Zhong, "Cross-Entropy Loss Functions: Theoretical Analysis and Applications",
ICML 2023 (arXiv:2304.07288), Sec. 3: Phi^tau(u) = log u for tau = 1, (u^{1-tau} - 1) / (1 - tau)
otherwise.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge

from sdk import classification as cls
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

LINEAR_FROM = 60.0
"""Beyond ``(1 - tau) (-log p_y) = 60`` the exponential is continued by its tangent (value and
slope kept), so tau < 1 gives finite losses for logit gaps whose exponential overflows."""


def phi(s: torch.Tensor, tau: float) -> torch.Tensor:
    """``Phi^tau(e^s)``: ``s`` for ``tau = 1``, else ``expm1((1 - tau) s) / (1 - tau)``."""
    if tau == 1:
        return s
    x = (1 - tau) * s
    head = x.clamp(max=LINEAR_FROM)
    return (torch.expm1(head) + head.exp() * (x - head)) / (1 - tau)


def comp_sum_loss(logits: torch.Tensor, t: cls.Targets, tau: float = 1.0) -> torch.Tensor:
    """Per-sample ``Phi^tau(1 / p_y)`` (``= (p_y^{tau - 1} - 1) / (1 - tau)``, ``-log p_y`` at
    ``tau = 1``); soft labels: ``sum_c q_c Phi^tau(1 / p_c)``."""
    if t.ids is not None:
        return phi(-cls.target_log_prob(logits, t), tau)
    return cls.pick(phi(-cls.log_probs(logits), tau), t)


class CompSumLoss(Objective):
    """The comp-sum loss of ``tau`` on ``Views.logits`` against class ids or soft labels."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, tau: Annotated[float, Ge(0)] = 1.0, ignore_index: int | None = None):
        super().__init__()
        self.tau, self.ignore_index = tau, ignore_index

    def forward(self, views: Views, batch: Batch) -> Loss:
        t = cls.targets("comp_sum_losses", views.logits, batch.targets, ignore_index=self.ignore_index)
        return cls.reduce(comp_sum_loss(views.logits, t, self.tau), t)


CARD = Card(
    name="comp_sum_losses", kind="objective",
    title="Cross-Entropy Loss Functions: Theoretical Analysis and Applications",
    paper="arXiv:2304.07288",
    summary="Phi^tau of 1 / p_y: sum-exp (tau = 0), cross-entropy (tau = 1), generalised "
            "cross-entropy (1 < tau < 2), mean absolute error (tau = 2).",
    formula="L = Phi^tau(sum_y' exp(h_y' - h_y)), Phi^tau(u) = log u (tau = 1), "
            "(u^{1 - tau} - 1) / (1 - tau) (tau != 1)",
    left_out="The adversarial (smooth adversarial comp-sum) variants and the H-consistency "
             "bounds' analysis. tau has no single recommended value in the paper: the default "
             "1 is cross-entropy. For tau < 1 the exponential is continued linearly beyond "
             "(1 - tau)(-log p_y) = 60 (finite values for extreme logit gaps).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CompSumLoss, card=CARD)
