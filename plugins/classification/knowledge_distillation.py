"""Knowledge distillation: match a teacher's temperature-softened class distribution.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
Learning Workshop (arXiv:1503.02531), Sec. 2: temperature T on both softmaxes, the soft term
multiplied by T^2, a weighted average with the hard-label cross-entropy.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt, Interval

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, t: cls.Targets | None,
                      temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Per-sample ``alpha T^2 KL(softmax(t/T) || softmax(z/T)) + (1 - alpha) CE(z, y)``."""
    soft = cls.distillation_kl(logits, teacher, temperature)
    if t is None:
        return alpha * soft
    return alpha * soft - (1 - alpha) * cls.target_log_prob(logits, t)


class KnowledgeDistillation(Objective):
    """Distils the teacher's logits, ``Views.extras[keys.TEACHER][0]`` (an encoding teacher's
    output on the first view: the ``ema`` teacher or :class:`sdk.classification.FrozenTeacher`),
    into ``Views.logits``; ``Batch.targets`` (ids or soft labels) are needed unless ``alpha = 1``."""

    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, temperature: Annotated[float, Gt(0)] = 4.0,
                 alpha: Annotated[float, Interval(ge=0, le=1)] = 0.9):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha
        self.requires = {"logits": True, "targets": alpha < 1, "extras": (keys.TEACHER,)}

    def forward(self, views: Views, batch: Batch) -> Loss:
        teacher = cls.teacher_logits("knowledge_distillation", views)
        t = None
        if self.alpha < 1:
            t = cls.targets("knowledge_distillation", views.logits, batch.targets)
        per_sample = distillation_loss(views.logits, teacher, t, self.temperature, self.alpha)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = torch.randn(batch_size, 5, generator=generator).requires_grad_()
        teacher = 2 * torch.randn(batch_size, 5, generator=generator)
        return (Views(logits=logits, extras={keys.TEACHER: (teacher,)}),
                Batch(targets=torch.arange(batch_size) % 5))


CARD = Card(
    name="knowledge_distillation", kind="objective",
    title="Distilling the Knowledge in a Neural Network", paper="arXiv:1503.02531",
    summary="Student logits matched to a teacher's at temperature T (KL, times T^2), mixed "
            "with the hard-label cross-entropy.",
    formula="L = alpha T^2 KL(softmax(t/T) || softmax(z/T)) + (1 - alpha) CE(softmax(z), y)",
    left_out="The paper gives no single alpha (it weights the hard term 'considerably lower'): "
             "0.9 is the common choice; T = 4 as in the issue. Specialist ensembles and the "
             "logit-matching (high-T) limit as a separate loss are not implemented. A frozen "
             "teacher is sdk.classification.FrozenTeacher(model), not a registered plugin "
             "(it needs a trained model).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(KnowledgeDistillation, card=CARD)
