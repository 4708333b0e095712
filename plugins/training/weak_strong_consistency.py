"""Weak-to-strong consistency for source-free adaptation with a mean teacher: the teacher sees
the weakly augmented view, the student the strongly augmented one; the student matches the
teacher's class distribution, and the teacher's pseudo-labels guide a supervised contrast of
the student's strong-view features, so what strong augmentation erased is taken from the weak
view.

Tang, Yang, Ye, Wang, Gan & Zhu, "Rethinking Weak-to-Strong Augmentation in Source-Free Domain
Adaptive Object Detection" (WSCoL), arXiv:2410.05557 v1 (later versions: "Source-Free Domain
Adaptive Object Detection with Semantics Compensation", WSCo); the consistency term is the
authors' code's ``st_const`` (``KL(p_teacher_weak || p_student_strong)``, batch mean, weight 1)
and the contrast its ``con_loss`` on pseudo-labels (temperature 0.07)
(github.com/tntek/source-free-domain-adaptive-object-detection).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.contrastive import info_nce
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.semisup import pseudo_labels
from sdk.types import Batch, Loss, Views


def weak_strong_terms(teacher_weak: Tensor, student_strong: Tensor, features: Tensor, *,
                      threshold: float = 0.0, temperature: float = 0.07
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample: ``m_i KL(p_t(w_i) || p_s(s_i))`` with ``m_i = [max_c p_t(c|w_i) >= tau]``, and
    the supervised contrast of the L2-normalised ``features`` among the kept rows, positives
    the other kept rows of the same teacher pseudo-label ``argmax p_t(w)``::

        C_i = -1/|P_i| sum_{p in P_i} log(exp(f_i.f_p / T) / sum_{a kept, a != i} exp(f_i.f_a / T))

    Returns ``(kl [B], contrast [B] (0 where no positive), anchors [B], kept [B])``; the
    teacher's outputs carry no gradient."""
    confidence, labels = pseudo_labels(teacher_weak)
    kept = confidence >= threshold
    log_t = torch.log_softmax(cls.upcast(teacher_weak.detach()), -1)
    log_s = torch.log_softmax(cls.upcast(student_strong), -1)
    kl = torch.where(kept, (log_t.exp() * (log_t - log_s)).sum(-1), 0.0)
    f = F.normalize(cls.upcast(features), dim=-1)
    others = kept[None, :] & kept[:, None] & ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    same = labels[:, None] == labels[None, :]
    contrast, anchors = info_nce(f @ f.T / temperature, others & same, others & ~same)
    return kl, contrast, anchors, kept


class WeakStrongConsistency(Objective):
    """Two unlabelled views, weak then strong: the mean teacher's outputs on the weak view
    ``Views.extras["teacher"][0]`` (e.g. the ``ema`` teacher), the student's class scores on
    the strong view ``Views.embeddings[1]`` and its features there ``Views.extras["features"][1]``
    (the scores themselves without it)::

        L = 1/B sum_i m_i KL(p_t(w_i) || p_s(s_i)) + lambda 1/|A| sum_{i in A} C_i

    ``A`` the kept rows with a positive; ``gather`` ("auto": under DDP) contrasts the global
    batch, as one process would. The student's weak-view output ``Views.embeddings[0]`` is not
    read: the weak view reaches the loss through the teacher only, as in the paper."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    consumes = frozenset({Input.FEATURES})
    batch_coupled = True

    def __init__(self, threshold: Annotated[float, Interval(ge=0, le=1)] = 0.0,
                 temperature: Annotated[float, Gt(0)] = 0.07,
                 contrast_weight: Annotated[float, Ge(0)] = 1.0,
                 gather: Gather = "auto"):
        super().__init__()
        self.threshold, self.temperature, self.contrast_weight, self.gather = (
            threshold, temperature, contrast_weight, gather)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        strong = views.embeddings[1]
        entry = views.extras[keys.TEACHER]
        teacher = entry[0] if isinstance(entry, (tuple, list)) else entry
        if not isinstance(teacher, Tensor) or teacher.shape != strong.shape \
                or not teacher.is_floating_point():
            got = list(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
            raise ShapeError(f"{owner}: Views.extras['teacher'][0] (the teacher on the weak view) "
                             f"must be floating {list(strong.shape)} like the student's strong-view "
                             f"scores Views.embeddings[1], got {got}")
        entry = views.extras.get(keys.FEATURES)
        h = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 else strong
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[0] != strong.shape[0] \
                or not h.is_floating_point():
            got = list(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ShapeError(f"{owner}: Views.extras['features'][1] must be floating "
                             f"[{strong.shape[0]}, D], got {got}")
        b = strong.shape[0]
        gathered = resolve_gather(self.gather)
        if gathered:
            teacher, strong, h = gather_no_grad(teacher), gather_with_grad(strong), gather_with_grad(h)
        kl, contrast, anchors, kept = weak_strong_terms(
            teacher, strong, h, threshold=self.threshold, temperature=self.temperature)
        n = len(kl)
        per_sample = kl + self.contrast_weight * contrast * (n / anchors.sum().clamp_min(1))
        value = per_sample.mean()
        if gathered:
            per_sample = per_sample[rank() * b:(rank() + 1) * b]
        return Loss(value=value, per_sample=per_sample,
                    logs={"consistency": kl.mean().detach(),
                          "contrast": (contrast.sum() / anchors.sum().clamp_min(1)).detach(),
                          "kept": kept.float().mean().detach()})

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: the student's scores on both views (4 classes; the weak
        one unused, so it needs no gradient) and the sharp teacher's scores on both views."""
        weak = torch.randn(batch_size, 4, generator=g)
        strong = torch.randn(batch_size, 4, generator=g).requires_grad_()
        teacher = tuple(3 * torch.randn(batch_size, 4, generator=g) for _ in range(2))
        return Views(embeddings=(weak, strong), extras={keys.TEACHER: teacher}), Batch()


CARD = Card(
    name="weak_strong_consistency", kind="objective",
    title="Rethinking Weak-to-Strong Augmentation in Source-Free Domain Adaptive Object Detection",
    paper="arXiv:2410.05557",
    summary="Mean-teacher adaptation without source data: the student's strong-view class "
            "distribution matches the teacher's weak-view one (KL), and the teacher's pseudo-labels "
            "drive a supervised contrast of the student's strong-view features.",
    formula="m_i = [max p_t(w_i) >= tau]; L = 1/B sum_i m_i KL(p_t(w_i) || p_s(s_i)) + lambda "
            "1/|A| sum_{i in A} -1/|P_i| sum_{p in P_i} log softmax_{a kept, a != i}(f_i.f_a / T)_p, "
            "P_i = kept rows of i's pseudo-label; tau = 0 (every row), T = 0.07, lambda = 1",
    left_out="The detector (proposals, RoI features, box matching) and WSCoL's further parts: the "
             "mapping network into a shared space, the prototype clustering of weak features "
             "with a memory bank that gives the pseudo-labels (here argmax of the teacher's "
             "weak-view prediction), the reliability matrix, the uncertainty-aware background "
             "contrast and the switch on proposal variance. lambda (the code passes a schedule "
             "'weight') and tau (the code keeps every proposal) are our defaults; the mean "
             "teacher is the ema teacher plugin.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(WeakStrongConsistency, card=CARD)
