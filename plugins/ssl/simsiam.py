"""SimSiam: a Siamese network whose predictor regresses the other view's stop-gradient
projection; no negatives, no momentum encoder.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from annotated_types import Ge

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import Predictor, negative_cosine
from sdk.types import Batch, Loss, Views


def simsiam_loss(predictions: Sequence[torch.Tensor], projections: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per sample ``[B]``: the mean over ordered pairs of views ``v != w`` of
    ``D(p_v, sg(z_w)) = -cos(p_v, sg(z_w))``; for two views the paper's
    ``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` (eq. 2)."""
    terms = [negative_cosine(p, z) for v, p in enumerate(predictions)
             for w, z in enumerate(projections) if v != w]
    return torch.stack(terms).mean(0)


class SimSiam(Objective):
    """SimSiam's loss on the encoder's projections ``z_v`` (``Views.embeddings``): the
    predictor ``h`` (``dim -> hidden_dim -> dim``, batch norm on its hidden layer, none at its
    output: the paper's 2048 -> 512 -> 2048 bottleneck) belongs to this objective, and the
    target ``z_w`` is detached (the stop-gradient that prevents collapse). The projector is the
    encoder's head: ``projection_head`` with ``hidden_dim=2048, out_dim=2048, layers=3,
    last_norm=True`` (batch norm on every layer, including the output)."""

    requires = {"views": 2}
    batch_coupled = False  # per sample given the predictor (whose batch norm is per rank)

    def __init__(self, dim: Annotated[int, Ge(1)] = 2048, hidden_dim: Annotated[int, Ge(1)] = 512):
        super().__init__()
        self.predictor = Predictor(dim, hidden_dim, owner="objective 'simsiam'")

    def forward(self, views: Views, batch: Batch) -> Loss:
        preds = [self.predictor(z, f"Views.embeddings[{v}]") for v, z in enumerate(views.embeddings)]
        per_sample = simsiam_loss(preds, views.embeddings)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of ``[B, dim]`` projections."""
        d = self.predictor.dim
        z = tuple(torch.randn(batch_size, d, generator=generator).requires_grad_() for _ in range(2))
        return Views(embeddings=z), Batch()


CARD = Card(
    name="simsiam", kind="objective",
    title="Exploring Simple Siamese Representation Learning",
    paper="arXiv:2011.10566",
    summary="Each view's prediction regresses the other view's stop-gradient projection "
            "(negative cosine); the stop-gradient alone prevents collapse.",
    formula="D(p, z) = -p/||p|| . z/||z||; L = sum_{v != w} D(h(z_v), sg(z_w)) / (V (V - 1)) "
            "(two views: D(p1, sg(z2))/2 + D(p2, sg(z1))/2)",
    left_out="The paper's fixed learning rate of the predictor (a parameter group of the "
             "optimizer, not part of the loss). The predictor's batch norm uses each rank's "
             "batch under DDP (no SyncBatchNorm).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SimSiam, card=CARD)
