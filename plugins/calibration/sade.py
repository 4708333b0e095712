"""SADE: three experts trained with a forward (softmax), uniform (balanced softmax) and backward
(inverse softmax) logit adjustment, so that one model holds experts for a long-tailed, a
uniform and an inversely long-tailed test class distribution.

Zhang, Hooi, Hong, Feng, "Self-Supervised Aggregation of Diverse Experts for Test-Agnostic
Long-Tailed Recognition", NeurIPS 2022 (arXiv:2107.09249), equations (2)-(4); the inverse
prior as in the authors' code (``DiverseExpertLoss.inverse_prior``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk import classification as cls
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

__all__ = ["CARD", "SADE", "aggregation_weights", "expert_adjustments", "inverse_prior", "sade_loss"]

NUM_EXPERTS = 3
_LOG_EPS = 1e-9  # the authors' log(prior + 1e-9)


def inverse_prior(prior: Tensor) -> Tensor:
    """``pi_bar``: the prior's values reversed in rank order: the class with the ``r``-th
    smallest prior gets the ``r``-th largest value (ties keep a stable order)."""
    value, order = prior.sort(stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(prior.numel(), device=prior.device))
    return value[prior.numel() - 1 - rank]


def expert_adjustments(prior: Tensor, tau: float) -> Tensor:
    """``[3, C]``: the logit adjustments of the forward (0), uniform (``log pi``) and backward
    (``log pi - tau log pi_bar``) experts."""
    log_pi = (prior + _LOG_EPS).log()
    backward = log_pi - tau * (inverse_prior(prior) + _LOG_EPS).log()
    return torch.stack([torch.zeros_like(log_pi), log_pi, backward])


def sade_loss(expert_logits: Tensor, labels: Tensor, prior: Tensor, tau: float = 2.0) -> Tensor:
    """Per-sample ``sum_k CE(v_k + a_k, y)`` [B] for ``expert_logits [B, 3, C]``."""
    z = cls.upcast(expert_logits) + expert_adjustments(prior.to(cls.compute_dtype(expert_logits)), tau)
    b, k, c = z.shape
    ce = F.cross_entropy(z.reshape(b * k, c), labels.repeat_interleave(k), reduction="none")
    return ce.view(b, k).sum(dim=1)


def aggregation_weights(view1: Tensor, view2: Tensor, steps: int = 400, lr: float = 0.025) -> Tensor:
    """SADE's test-time self-supervised aggregation: the expert weights ``w = softmax(theta)``
    (from ``w = 1/3`` each) that maximise the prediction stability ``mean_i cos(softmax(sum_k w_k
    v_k(x_i')), softmax(sum_k w_k v_k(x_i'')))`` of two views ``[N, 3, C]`` of unlabelled test
    data, by ``steps`` full-batch SGD steps (momentum 0.9, as the authors' test-time training);
    returns ``w [3]``."""
    a, b = view1.detach().double(), view2.detach().double()
    theta = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=0.9)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            w = theta.softmax(0)[:, None]
            p1, p2 = ((v * w).sum(dim=1).softmax(dim=1) for v in (a, b))
            (-F.cosine_similarity(p1, p2, dim=1).mean()).backward()
            opt.step()
    return theta.detach().softmax(0)


def _prior(owner: str, class_counts: Any, labels: Any) -> Tensor | None:
    if class_counts is not None and labels is not None:
        raise ConfigError(f"{owner}: give class_counts or labels, not both", param="class_counts")
    if labels is not None:
        ids = torch.as_tensor(labels).long().reshape(-1)
        if ids.numel() == 0 or int(ids.min()) < 0:
            raise ConfigError(f"{owner}: labels must be non-negative class ids, got {ids.numel()} "
                              "entries", param="labels")
        counts = torch.bincount(ids).double()
    elif class_counts is not None:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    else:
        return None
    if counts.numel() < 2 or bool((counts <= 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ConfigError(f"{owner}: the training class counts must be positive, one per class "
                          f"(at least 2), got {counts.tolist()}", param="class_counts")
    return (counts / counts.sum()).float()


class SADE(Objective):
    """``Views.logits [B, 3 C]``: the forward, uniform and backward experts' logits side by
    side; the loss is the sum of their three logit-adjusted cross-entropies. The training
    prior ``pi`` comes from ``class_counts`` or the training ``labels`` (filled from the data);
    without either it is uniform (then every adjustment is a constant and each expert's loss is
    the plain cross-entropy)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = False

    def __init__(self, tau: Annotated[float, Ge(0)] = 2.0,
                 class_counts: tuple[float, ...] | None = None,
                 labels: Annotated[object | None, FromData("labels")] = None):
        super().__init__()
        self.tau = tau
        prior = _prior("sade", class_counts, labels)
        self.register_buffer("prior", torch.zeros(0) if prior is None else prior)

    def experts(self, logits: Tensor) -> Tensor:
        """``[B, 3, C]``: the three experts' logits of ``Views.logits [B, 3 C]``."""
        width = logits.shape[1]
        c = self.prior.numel() or width // NUM_EXPERTS
        if width != NUM_EXPERTS * c or c < 1:
            what = (f"3 x {self.prior.numel()} classes" if self.prior.numel()
                    else "a multiple of 3 (three experts)")
            raise ShapeError(f"sade: Views.logits must hold the three experts' logits side by side, "
                             f"{what} wide, got {list(logits.shape)}")
        return logits.view(logits.shape[0], NUM_EXPERTS, c)

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = self.experts(views.logits)
        t = cls.targets("sade", z[:, 0], batch.targets, soft=False)
        prior = self.prior if self.prior.numel() else z.new_full((z.shape[2],), 1 / z.shape[2])
        per_sample = sade_loss(z, t.ids, prior.to(z.device), self.tau)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        c = self.prior.numel() or 5
        logits = torch.randn(batch_size, NUM_EXPERTS * c, generator=g).requires_grad_()
        return (Views(logits=logits),
                Batch(targets=torch.arange(batch_size) % c, index=torch.randperm(batch_size, generator=g)))


CARD = Card(
    name="sade", kind="objective",
    title="Self-Supervised Aggregation of Diverse Experts for Test-Agnostic Long-Tailed "
          "Recognition",
    paper="arXiv:2107.09249",
    summary="Trains three experts on one long-tailed set with different logit adjustments: "
            "softmax (the training prior), balanced softmax (uniform) and inverse softmax "
            "(the inverted prior), for test class distributions that are unknown.",
    formula="L = CE(v1, y) + CE(v2 + log pi, y) + CE(v3 + log pi - tau log pi_bar, y); pi the "
            "training class prior, pi_bar its values reversed in rank order (the largest prior "
            "goes to the rarest class), tau = 2; Views.logits = [v1 | v2 | v3] [B, 3C]",
    left_out="The multi-expert network (shared early layers, one late block and head per expert) "
             "is the encoder's part. The test-time self-supervised aggregation (expert weights "
             "maximising the cosine stability of the predictions on two views of unlabelled test "
             "data) is the function aggregation_weights of this module, not a registered "
             "calibrator: a calibrator is fitted on labelled scores [N, C], the aggregation on two "
             "unlabelled views [N, 3, C]. log(pi + 1e-9) as the authors' code; tau = 2 is the "
             "code's CIFAR setting (other data sets use other values); the aggregation runs "
             "full-batch SGD (lr 0.025, momentum 0.9, 400 steps) where the code runs mini-batch "
             "epochs over the test set."
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SADE, card=CARD)
