"""Margin Preserving Training (MPT): fewer negative flips when a classifier is updated with new classes.

Ricci, Biondi, Pernici & Del Bimbo, "Mitigating Negative Flips via Margin Preserving
Training", AAAI 2026 (arXiv:2511.08322); the form and defaults follow the authors' code
(github.com/miccunifi/negative_flip_MPT, main.py method ``MPT_KL`` / ``MPT_LM`` and loss.py):
cross-entropy on logits whose new classes get a positive bias ``b`` during training (so the
model must learn a larger margin for them: the old classes' margins are preserved at test
time, without the bias), plus a focal distillation from the old model on the old classes and
one from an independently trained new model on all classes, each weighted ``alpha + beta``
on samples the reference model classifies correctly.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def focal_distillation(student: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor, *,
                       alpha: float, beta: float, temperature: float, kind: str) -> torch.Tensor:
    """Per-sample ``(alpha + beta [argmax r = y]) D(z, r)``; ``D`` is ``KL(softmax(r/T) ||
    softmax(z/T))`` (``kind="kl"``, no ``T^2``, as the code) or ``0.4 mean_k (z_k - r_k)^2 / 2``
    (``kind="lm"``)."""
    z = cls.upcast(student)
    r = reference.to(z.dtype)
    weight = alpha + beta * (r.argmax(-1) == ids).to(z.dtype)
    if kind == "kl":
        log_s, log_r = (v.div(temperature).log_softmax(-1) for v in (z, r))
        d = (log_r.exp() * (log_r - log_s)).sum(-1)
    else:
        d = 0.4 * (z - r).square().mean(-1) / 2
    return weight * d


def mpt_loss(logits: torch.Tensor, ids: torch.Tensor, old: torch.Tensor, new: torch.Tensor, *,
             bias: float = 4.0, alpha: float = 1.0, beta: float = 5.0, temperature: float = 5.0,
             kind: str = "kl") -> torch.Tensor:
    """Per-sample ``CE(z + b [k >= K_old], y) + FD(z[:, :K_old], old) + FD(z, new)``; ``old``
    [B, K_old] the previous model's logits, ``new`` [B, C] the independently trained new model's."""
    z = cls.upcast(logits)
    k_old = old.shape[1]
    shift = torch.zeros(z.shape[1], dtype=z.dtype, device=z.device)
    shift[k_old:] = bias
    ce = torch.nn.functional.cross_entropy(z + shift, ids, reduction="none")
    options = dict(alpha=alpha, beta=beta, temperature=temperature, kind=kind)
    return (ce + focal_distillation(z[:, :k_old], old, ids, **options)
            + focal_distillation(z, new, ids, **options))


class MarginPreservingNFR(Objective):
    """MPT on ``Views.logits`` [B, C] (the updated model; the old classes are the first
    ``K_old``) against class ids, with the two reference models' logits side by side in
    ``Views.extras[keys.TEACHER][0]`` [B, K_old + C]: the old model's, then the new
    reference model's (one FrozenTeacher around both; ``K_old`` is read from the width)."""

    requires = {"logits": True, "targets": True, "extras": (keys.TEACHER,)}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = False

    def __init__(self, bias: float = 4.0, alpha: Annotated[float, Ge(0)] = 1.0,
                 beta: Annotated[float, Ge(0)] = 5.0, temperature: Annotated[float, Gt(0)] = 5.0,
                 distill: Annotated[str, one_of(("kl", "lm"))] = "kl"):
        super().__init__()
        self.bias, self.alpha, self.beta = bias, alpha, beta
        self.temperature, self.distill = temperature, distill

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets("margin_preserving_nfr", z, batch.targets, soft=False)
        b, c = z.shape
        entry = views.extras[keys.TEACHER]
        ref = entry[0] if isinstance(entry, (tuple, list)) else entry
        if (not isinstance(ref, torch.Tensor) or not ref.is_floating_point() or ref.dim() != 2
                or ref.shape[0] != b or not c < ref.shape[1] <= 2 * c):
            got = list(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ShapeError(f"margin_preserving_nfr: Views.extras[{keys.TEACHER!r}] must hold the old "
                             f"and the new reference models' logits side by side [{b}, K_old + {c}] "
                             f"(0 < K_old <= {c}), got {got}")
        ref = ref.detach()
        k_old = ref.shape[1] - c
        per_sample = mpt_loss(z, t.ids, ref[:, :k_old], ref[:, k_old:], bias=self.bias,
                              alpha=self.alpha, beta=self.beta, temperature=self.temperature,
                              kind=self.distill)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = torch.randn(batch_size, 6, generator=generator).requires_grad_()
        ref = 2 * torch.randn(batch_size, 3 + 6, generator=generator)
        return (Views(logits=logits, extras={keys.TEACHER: (ref,)}),
                Batch(targets=torch.arange(batch_size) % 6))


CARD = Card(
    name="margin_preserving_nfr", kind="objective",
    title="Mitigating Negative Flips via Margin Preserving Training", paper="arXiv:2511.08322",
    summary="Updating a classifier with new classes: cross-entropy with a positive logit bias on "
            "the new classes during training (margin calibration) plus focal distillation from "
            "the old model and from an independently trained new model, to lower negative flips.",
    formula="L = CE(z + b [k >= K_old], y) + sum_{(s, r) in {(z[:K_old], o), (z, n)}} "
            "mean_i (alpha + beta [argmax r_i = y_i]) KL(softmax(r_i / T) || softmax(s_i / T)); "
            "distill='lm': 0.4 (alpha + beta [..]) mean_k (s_ik - r_ik)^2 / 2 instead of KL",
    left_out="The catalogue's 'hinge on the margin difference' is not the paper's term: the "
             "margin calibration is the code's bias b on the new classes' logits in the "
             "cross-entropy. Defaults (b = 4, alpha = 1, beta = 5, T = 5, no T^2 factor) are "
             "the code's MPT_KL. The old classes are the first K_old of the updated model's; "
             "both reference models come through one teacher (their logits side by side). "
             "The ELODI and PCT baselines of the code are not registered.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MarginPreservingNFR, card=CARD)
