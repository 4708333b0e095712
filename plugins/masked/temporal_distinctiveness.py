"""TeD-SPAD's temporal distinctiveness: a triplet loss that keeps a clip close to a differently
augmented copy of the same frames and a margin away from a clip taken at another time of the same
video.

Fioresi, Dave and Shah, "TeD-SPAD: Temporal Distinctiveness for Self-supervised
Privacy-preservation for Video Anomaly Detection", ICCV 2023 (arXiv:2308.11072).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def temporal_triplet(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0,
                     eps: float = 1e-6) -> Tensor:
    """``[B]``: ``max(0, ||a - p + eps|| - ||a - n + eps|| + margin)`` (the Euclidean triplet
    margin loss of the authors' ``nn.TripletMarginLoss``, its ``eps`` inside the norm), in float32
    (float64 for float64 inputs)."""
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    a, p, n = anchor.to(dtype), positive.to(dtype), negative.to(dtype)
    d_pos = (a - p + eps).norm(dim=-1)
    d_neg = (a - n + eps).norm(dim=-1)
    return torch.relu(d_pos - d_neg + margin)


class TemporalDistinctiveness(Objective):
    """``Views.embeddings``: the anchor clip's features, the same frames under another augmentation
    (positive) and a clip of the same video from another, random start time (negative), each
    ``[B, D]``; each further view is another negative (another time), and a sample's loss is the
    mean of its triplets (three views: the paper's). Loss: :func:`temporal_triplet` averaged over
    the batch; the paper adds it with
    weight 0.1 to the utility (action) loss, e.g. ``0.1 * temporal_distinctiveness +
    cross_entropy``."""

    requires = {"views": 3}
    batch_coupled = False

    def __init__(self, margin: Annotated[float, Ge(0)] = 1.0, eps: Annotated[float, Gt(0)] = 1e-6):
        super().__init__()
        self.margin, self.eps = margin, eps

    def forward(self, views: Views, batch: Batch) -> Loss:
        a, p, *negatives = views.embeddings
        per_sample = torch.stack([temporal_triplet(a, p, n, self.margin, self.eps)
                                  for n in negatives]).mean(0)
        return Loss(value=per_sample.mean(), per_sample=per_sample)


CARD = Card(
    name="temporal_distinctiveness", kind="objective",
    title="TeD-SPAD: Temporal Distinctiveness for Self-supervised Privacy-preservation for "
          "Video Anomaly Detection",
    paper="arXiv:2308.11072",
    summary="Temporally distinct clip features: a triplet margin loss pulls a clip towards the "
            "same frames under another augmentation and pushes it from a clip of the same video "
            "at another time.",
    formula="L = mean_b max(0, ||a_b - p_b + eps|| - ||a_b - n_b + eps|| + margin), margin = 1, "
            "eps = 1e-6; a, p: the same frames (two augmentations), n: a random other start time "
            "(further views: more negatives, their triplets averaged)",
    left_out="The video models (I3D utility network, UNet++ anonymiser, ResNet-50 privacy "
             "branch), the clip sampling from videos and the adversarial privacy term (the "
             "anonymiser maximises the privacy branch's NT-Xent, weight 1, with the utility loss "
             "weighted 0.7) are not here; the triplet term is, for any encoder's three views. "
             "Formula and defaults follow the authors' code (its nn.TripletMarginLoss, margin 1, "
             "weight 0.1 on the action loss); the seed entry's 'contrast clips from different "
             "times' is this triplet with one negative, not an InfoNCE.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(TemporalDistinctiveness, card=CARD)
