"""Decoupled mixup: mixup cross-entropy plus a decoupled softmax for each mixed class.

Liu, Li, Wang, Tan, Wu & Li, "Harnessing Hard Mixed Samples with Decoupled Regularizer",
NeurIPS 2023 (arXiv:2203.10761); the form follows the authors' OpenMixup
(github.com/Westlake-AI/openmixup, losses/cross_entropy_loss.py ``soft_mix_cross_entropy``):
for a mixed sample, each mixed class also gets a one-hot cross-entropy over itself and the
classes that are not mixed, so the mixed classes do not compete and a hard (low-lambda)
class is still pushed to be confident.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk import classification as cls
from sdk.card import Card
from sdk.constraints import one_of
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

MIXED = 1e-3
"""A class with a mixed label above this counts as mixed (OpenMixup's ``eps``)."""

MODES = ("both", "less", "more")


def decoupled_mixup_loss(logits: torch.Tensor, soft: torch.Tensor, eta: float = 0.1,
                         mode: str = "both", threshold: float = 0.5) -> torch.Tensor:
    """Per-sample ``-sum_c y_c log softmax(z)_c - eta sum_{i mixed} [selected(y_i)]
    log(e^{z_i} / (e^{z_i} + sum_{c not mixed} e^{z_c}))`` [B]; the second sum only for samples
    of two or more mixed classes; ``mode``: every mixed class (``"both"``), those with
    ``y_i < threshold`` (``"less"``) or ``y_i > threshold`` (``"more"``)."""
    y = soft.to(cls.compute_dtype(logits))
    local = -(y * cls.log_probs(logits)).sum(-1)
    mixed = y > MIXED
    mixed = mixed & (mixed.sum(-1, keepdim=True) >= 2)
    chosen = mixed if mode == "both" else mixed & ((y < threshold) if mode == "less" else (y > threshold))
    return local - eta * cls.decoupled_log_probs(logits, mixed).masked_fill(~chosen, 0.0).sum(-1)


class DecoupledMixup(Objective):
    """Decoupled mixup on ``Views.logits`` against mixed soft labels ``Batch.targets`` [B, C]
    (e.g. from the ``mixup`` transform); class ids are plain cross-entropy."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, eta: Annotated[float, Ge(0)] = 0.1,
                 mode: Annotated[str, one_of(MODES)] = "both",
                 threshold: Annotated[float, Interval(ge=0, le=1)] = 0.5):
        super().__init__()
        self.eta, self.mode, self.threshold = eta, mode, threshold

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets("decoupled_mixup", z, batch.targets)
        if t.ids is not None:  # one class per sample: nothing is mixed, the loss is CE
            per_sample = -cls.target_log_prob(z, t)
        else:
            per_sample = decoupled_mixup_loss(z, t.dense, self.eta, self.mode, self.threshold)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = torch.randn(batch_size, 5, generator=generator).requires_grad_()
        a, b = torch.arange(batch_size) % 5, (torch.arange(batch_size) + 2) % 5
        lam = 0.7
        soft = lam * torch.nn.functional.one_hot(a, 5) + (1 - lam) * torch.nn.functional.one_hot(b, 5)
        return Views(logits=logits), Batch(targets=soft.float())


CARD = Card(
    name="decoupled_mixup", kind="objective",
    title="Harnessing Hard Mixed Samples with Decoupled Regularizer", paper="arXiv:2203.10761",
    summary="Mixup cross-entropy plus, for each mixed class, a one-hot cross-entropy over that "
            "class and the non-mixed classes only (a decoupled softmax), weighted eta.",
    formula="L = -sum_c y~_c log softmax(z)_c - eta sum_{i in M} log(e^{z_i} / (e^{z_i} + "
            "sum_{c not in M} e^{z_c})), M = {c : y~_c > 1e-3} when |M| >= 2 (else the second "
            "term is absent)",
    left_out="eta = 0.1 follows the catalogue (OpenMixup's ImageNet setting, not verified "
             "here); OpenMixup's CIFAR configs use eta = 0.01 with mode 'less' or 'more' at "
             "threshold 0.5, which mode and threshold select. OpenMixup skips the decoupled "
             "term for a batch whose two mixing weights are equal (lambda = 0.5 exactly); here "
             "it applies to every mixed sample. The two-hot (sigmoid) variant, label-rescaling "
             "modes and the mixing itself (the mixup transform) are not part of this loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DecoupledMixup, card=CARD)
