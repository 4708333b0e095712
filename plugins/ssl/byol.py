"""BYOL: an online network predicts a momentum target network's projection of another view.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from annotated_types import Ge

from sdk import keys
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import LinearPredictor, Predictor, check_teacher, negative_cosine, teacher_target_example
from sdk.types import Batch, Loss, Views


def byol_loss(predictions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per sample ``[B]``: ``sum_{v != w} ||q_v / ||q_v|| - sg(z'_w) / ||z'_w|| ||^2 / (V - 1)``,
    where ``||a - b||^2 = 2 - 2 cos(a, b)`` for unit vectors: for two views, the paper's
    symmetrised ``L + L~`` (its eq. 2, computed with the views swapped)."""
    n = len(predictions)
    terms = [2 + 2 * negative_cosine(p, t) for v, p in enumerate(predictions)
             for w, t in enumerate(targets[:n]) if v != w]
    return torch.stack(terms).sum(0) / (n - 1)


class BYOL(Objective):
    """BYOL's loss on the encoder's projections ``z_v`` (``Views.embeddings``) and a momentum
    teacher's projections ``z'_v`` (``Views.extras["teacher"]``, from the ``ema`` teacher with
    its cosine schedule 0.996 -> 1). The predictor ``q`` (``dim -> hidden_dim -> dim``, batch
    norm inside, none at its output) belongs to this objective, so the teacher, a copy of the
    encoder, has none. The projector is the encoder's head (``projection_head`` with
    ``hidden_dim=4096, out_dim=256``: the paper's 2048 -> 4096 -> 256). ``hidden_dim=None``: a
    linear predictor ``W_p z`` without bias (:class:`sdk.ssl.LinearPredictor`), the one the
    ``directpred`` callback sets from the embeddings' correlation."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = False  # per sample given the predictor (whose batch norm is per rank)

    def __init__(self, dim: Annotated[int, Ge(1)] = 256,
                 hidden_dim: Annotated[int | None, Ge(1)] = 4096):
        super().__init__()
        self.predictor = (Predictor(dim, hidden_dim, owner="objective 'byol'") if hidden_dim is not None
                          else LinearPredictor(dim, owner="objective 'byol'"))

    def forward(self, views: Views, batch: Batch) -> Loss:
        targets = check_teacher("objective 'byol'", views)
        preds = [self.predictor(z, f"Views.embeddings[{v}]") for v, z in enumerate(views.embeddings)]
        per_sample = byol_loss(preds, targets)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of ``[B, dim]`` projections and the teacher's."""
        return teacher_target_example(batch_size, self.predictor.dim, generator)


CARD = Card(
    name="byol", kind="objective",
    title="Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
    paper="arXiv:2006.07733",
    summary="The online network's prediction of one view regresses the momentum target "
            "network's projection of the other (no negatives); use with the ema teacher.",
    formula="L = sum_{v != w} || q(z_v)/||q(z_v)|| - sg(z'_w)/||z'_w|| ||^2 / (V - 1) "
            "= sum_{v != w} (2 - 2 cos(q(z_v), sg(z'_w))) / (V - 1); "
            "theta' <- tau theta' + (1 - tau) theta, tau: 0.996 -> 1 (cosine)",
    left_out="The momentum target is the ema teacher (give it to the Trainer; its defaults are "
             "BYOL's 0.996 -> 1 cosine schedule); LARS and the paper's image augmentations "
             "are not part of the loss. The predictor's batch norm uses each rank's batch "
             "under DDP (no SyncBatchNorm).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BYOL, card=CARD)
