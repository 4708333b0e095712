"""Poly-1 loss: cross-entropy plus ``epsilon (1 - p_t)``, the first term of its polynomial expansion.

Leng, Tan, Liu, Cubuk, Shi, Cheng, Anguelov & Tan, "PolyLoss: A Polynomial Expansion
Perspective of Classification Loss Functions", ICLR 2022 (arXiv:2204.12511), eq. 3; epsilon = 1.
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


def poly1_loss(logits: torch.Tensor, t: cls.Targets, epsilon: float = 1.0) -> torch.Tensor:
    """Per-sample ``-log p_t + epsilon (1 - p_t)``, ``p_t = sum_c q_c softmax(z)_c`` (ids: ``q``
    one-hot, so ``p_t = p_y``; soft labels as in the paper's code, ``-log p_t`` then the soft
    cross-entropy ``-sum_c q_c log p_c``)."""
    if t.ids is not None:
        logp_y = cls.target_log_prob(logits, t)
        return -logp_y + epsilon * (1 - logp_y.exp())
    logp = cls.log_probs(logits)
    return -cls.pick(logp, t) + epsilon * (1 - cls.pick(logp.exp(), t))


class PolyLoss(Objective):
    """Poly-1 on ``Views.logits`` against class ids or soft labels; ``epsilon = 0`` is
    cross-entropy."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, epsilon: Annotated[float, Ge(-1)] = 1.0,
                 class_weights: tuple[float, ...] | None = None, ignore_index: int | None = None):
        super().__init__()
        self.epsilon, self.ignore_index = epsilon, ignore_index
        self.register_buffer("class_weights", cls.weight_buffer("poly_loss", class_weights))

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        w = self.class_weights
        cls.class_weights("poly_loss", w, z.shape[1])
        t = cls.targets("poly_loss", z, batch.targets, ignore_index=self.ignore_index)
        per_sample = poly1_loss(z, t, self.epsilon)
        if w is not None and t.ids is None:  # soft labels: the expected class weight
            per_sample = per_sample * cls.pick(w[None].to(per_sample.dtype), t)
        return cls.reduce(per_sample, t, w)


CARD = Card(
    name="poly_loss", kind="objective",
    title="PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions",
    paper="arXiv:2204.12511",
    summary="Cross-entropy with its leading polynomial coefficient raised by epsilon (Poly-1).",
    formula="L_Poly-1 = -log p_t + epsilon (1 - p_t), p_t = sum_c q_c softmax(z)_c",
    left_out="Poly-N (N > 1) and the focal-loss-based Poly-1 variant of the detection "
             "experiments; class weights scale a sample's whole loss (soft labels: by sum_c w_c q_c).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PolyLoss, card=CARD)
