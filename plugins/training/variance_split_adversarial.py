"""TITAN's variance split and adversarial alignment, for classification: the mean teacher's
prediction variance splits each unlabelled target batch into "easy" (source-like, high variance)
and "hard" samples; the easy samples give confident pseudo-labels to the student, and a domain
discriminator behind a gradient-reversal layer aligns the student's features of the two
subsets.

Ashraf & Bashir, "TITAN: Query-Token based Domain Adaptive Adversarial Learning", ICCV 2025
(arXiv:2506.21484): higher detection variance goes with higher recall and greater similarity to
the source domain, so the high-variance part of the target set is the easy subset.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk import classification as cls
from sdk import keys
from sdk.adversarial import reverse_gradient
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def variance_split(teacher_logits: Tensor, rho: float = 0.5) -> tuple[Tensor, Tensor]:
    """The score ``s_i = Var_c p_t(c | x_i)`` (population variance of the teacher's softmax over
    the classes) and the mask of the easy samples, the ``ceil(rho B)`` highest scores (ties to
    the lower index)."""
    p = torch.softmax(teacher_logits.detach().float(), dim=1)
    score = p.var(dim=1, unbiased=False)
    k = math.ceil(rho * score.shape[0])
    order = torch.sort(score, descending=True, stable=True).indices
    easy = torch.zeros_like(score, dtype=torch.bool)
    easy[order[:k]] = True
    return score, easy


class VarianceSplitAdversarial(Objective):
    """On an unlabelled target batch: student logits ``Views.logits``, the mean teacher's logits
    ``Views.extras["teacher"]`` (e.g. the ``ema`` teacher, momentum 0.999) and the student's
    features ``Views.extras["features"][0]`` (``Views.embeddings[0]`` without a head)::

        easy = top ceil(rho B) of Var_c p_t(c|x)
        L = 1/B sum_i [easy_i and max_c p_t(c|x_i) > tau] CE(z_i, argmax p_t(x_i))
          + 1/B sum_i BCE(D(GRL_lambda(h_i)), easy_i)

    The discriminator ``D`` (``feature_dim -> hidden_dim -> 1``, ReLU) is the objective's and
    learns to tell the subsets apart; the reversal gives the features ``-lambda`` times its
    gradient, so the student aligns them. ``gather`` ("auto": under DDP) splits and reduces over
    the global batch, as one process would."""

    requires = {"views": 1, "logits": True, "extras": (keys.TEACHER,)}
    consumes = frozenset({Input.LOGITS, Input.FEATURES})
    batch_coupled = True

    def __init__(self, feature_dim: Annotated[int, Ge(1)] = 128,
                 hidden_dim: Annotated[int, Ge(1)] = 64,
                 rho: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
                 threshold: Annotated[float, Interval(ge=0, le=1)] = 0.8,
                 grl_lambda: Annotated[float, Ge(0)] = 0.1,
                 gather: Gather = "auto"):
        super().__init__()
        self.feature_dim, self.rho, self.threshold, self.grl_lambda, self.gather = (
            feature_dim, rho, threshold, grl_lambda, gather)
        self.discriminator = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(),
                                           nn.Linear(hidden_dim, 1))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        z = views.logits
        teacher = cls.teacher_logits(owner, views)
        entry = views.extras.get(keys.FEATURES, views.embeddings[0])
        h = entry[0] if isinstance(entry, (tuple, list)) else entry
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape != (z.shape[0], self.feature_dim) \
                or not h.is_floating_point():
            got = list(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ShapeError(f"{owner}: the features must be floating [{z.shape[0]}, {self.feature_dim}] "
                             f"(feature_dim={self.feature_dim}), got {got}")
        b = z.shape[0]
        gathered = resolve_gather(self.gather)
        if gathered:
            z, teacher, h = gather_with_grad(z), gather_no_grad(teacher), gather_with_grad(h)
        _, easy = variance_split(teacher, self.rho)
        p_t = torch.softmax(teacher.float(), dim=1)
        confidence, pseudo = p_t.max(dim=1)
        keep = easy & (confidence > self.threshold)
        ce = torch.where(keep, F.cross_entropy(cls.upcast(z), pseudo, reduction="none"), 0.0)
        d = self.discriminator(reverse_gradient(h.to(self.discriminator[0].weight.dtype), self.grl_lambda))
        adv = F.binary_cross_entropy_with_logits(d[:, 0].float(), easy.float(), reduction="none")
        per_sample = ce + adv
        value = per_sample.mean()
        if gathered:
            per_sample = per_sample[rank() * b:(rank() + 1) * b]
        return Loss(value=value, per_sample=per_sample,
                    logs={"pseudo_label": ce.mean().detach(), "adversarial": adv.mean().detach(),
                          "pseudo_labelled": keep.float().mean().detach()})

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: student logits (3 classes), sharp and flat teacher logits and
        features of ``feature_dim`` (as the embedding)."""
        logits = torch.randn(batch_size, 3, generator=g).requires_grad_()
        teacher = 4 * torch.randn(batch_size, 3, generator=g)
        feats = torch.randn(batch_size, self.feature_dim, generator=g).requires_grad_()
        return Views(embeddings=(feats,), logits=logits, extras={keys.TEACHER: (teacher,)}), Batch()


CARD = Card(
    name="variance_split_adversarial", kind="objective",
    title="TITAN: Query-Token based Domain Adaptive Adversarial Learning",
    paper="arXiv:2506.21484",
    summary="Splits unlabelled target samples by the mean teacher's prediction variance into easy "
            "(high variance, source-like) and hard; pseudo-labels the confident easy ones and aligns "
            "easy and hard features with a domain discriminator behind gradient reversal.",
    formula="s_i = Var_c p_t(c|x_i); easy = top ceil(rho B) of s (rho = 0.5); L = 1/B sum_i "
            "[easy_i, max p_t > tau] CE(z_i, argmax p_t) + 1/B sum_i BCE(D(GRL_lambda(h_i)), easy_i), "
            "tau = 0.8, lambda = 0.1",
    left_out="The detector: DETR query tokens, box-level detection variance over the teacher's "
             "detections and the query-token adversarial modules become, for classification, the "
             "variance of the teacher's class probabilities and one discriminator on the student's "
             "features. The split is per (global) batch, not over the whole target set; the mean "
             "teacher is the ema teacher plugin; rho = 0.5, tau = 0.8 and lambda = 0.1 are the "
             "catalogue's values, reconstructed from the abstract (the paper's full text and "
             "code were not reachable to check them or the split rule), "
             "the discriminator's width ours. The sampler part of the catalogue entry (a data "
             "sampler of the subsets) is not implemented; the split lives in the objective "
             "(variance_split). No source-free detection benchmarks or medical datasets.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VarianceSplitAdversarial, card=CARD)
