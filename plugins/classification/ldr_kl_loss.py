"""LDR-KL: the label-distributionally robust loss with a KL regulariser towards uniform weights.

Zhu, Ying & Yang, "Label Distributionally Robust Losses for Multi-class Classification:
Consistency, Robustness and Adaptivity", ICML 2023 (arXiv:2112.14869); scores normalised and
defaults (lambda = 10, margin 0.1) as in the authors' code (github.com/Optimization-AI/ICML2023_LDR,
loss.py LDRLoss_V1 and experiment.py).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt

from sdk import classification as cls
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def normalized_scores(logits: torch.Tensor) -> torch.Tensor:
    """``softplus(o) / mean_k softplus(o_k)`` per row: positive scores of mean 1."""
    s = F.softplus(cls.upcast(logits))
    return s / s.mean(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def ldr_kl_loss(scores: torch.Tensor, t: cls.Targets, lam: float = 10.0,
                margin: float = 0.1) -> torch.Tensor:
    """Per-sample ``max_{p in simplex} sum_k p_k (c [k != y] + f_k - f_y) - lam KL(p || 1/K)``
    ``= lam log((1/K) sum_k exp((c [k != y] + f_k - f_y) / lam))``, computed as
    ``lam (logaddexp(lse_{k != y}(f_k / lam) + c / lam, f_y / lam) - f_y / lam - log K)``
    (no ``[B, C]`` margin matrix; exact for small lam)."""
    k = scores.shape[1]
    f = scores / lam
    f_y = cls.pick(f, t)
    if k == 1:  # the target is the only class: no margin to pay
        return 0 * f_y
    others = torch.logsumexp(f.scatter(-1, t.ids[:, None], float("-inf")), -1)
    return lam * (torch.logaddexp(others + margin / lam, f_y) - f_y - math.log(k))


class LDRKLLoss(Objective):
    """LDR-KL on ``Views.logits`` against class ids; ``lam -> 0`` is the Crammer-Singer hinge
    ``max_k (c [k != y] + f_k - f_y)``, ``lam -> inf`` the mean of the margins."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = False

    def __init__(self, lam: Annotated[float, Gt(0)] = 10.0, margin: Annotated[float, Ge(0)] = 0.1,
                 normalize: bool = True):
        super().__init__()
        self.lam, self.margin, self.normalize = lam, margin, normalize

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets("ldr_kl_loss", z, batch.targets, soft=False)
        f = normalized_scores(z) if self.normalize else cls.upcast(z)
        per_sample = ldr_kl_loss(f, t, self.lam, self.margin)
        return Loss(value=per_sample.mean(), per_sample=per_sample)


CARD = Card(
    name="ldr_kl_loss", kind="objective",
    title="Label Distributionally Robust Losses for Multi-class Classification: Consistency, "
          "Robustness and Adaptivity",
    paper="arXiv:2112.14869",
    summary="Worst case over label weights p of the margin-shifted score gaps, regularised by "
            "KL(p || uniform): a log-sum-exp with temperature lambda, robust to label noise.",
    formula="f = softplus(o) / mean(softplus(o)); "
            "L = lambda log((1/K) sum_k exp((c [k != y] + f_k - f_y) / lambda))",
    left_out="The adaptive variant ALDR-KL (a lambda learned per sample from the KL of its "
             "predicted distribution, kept per dataset index) and the top-k variants. The score "
             "normalisation (softplus, divided by the row mean) is the authors' code's; "
             "normalize=False uses the raw logits. Class-id targets only.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LDRKLLoss, card=CARD)
