"""Adam-v2's composability and decomposability: a whole image's embedding is predicted from its
parts' embeddings (composition), and the parts' embeddings from the whole's (decomposition), each
against a momentum teacher.

Hosseinzadeh Taher, Gotway and Liang, "Representing Part-Whole Hierarchies in Foundation Models by
Learning Localizability, Composability, and Decomposability from Anatomy via Self-Supervision",
CVPR 2024 (arXiv:2404.15672).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import at_least_float32, check_teacher
from sdk.types import Batch, Loss, Views


def composability_loss(composed: Tensor, teacher_whole: Tensor) -> Tensor:
    """``[B]``: ``mean_d (normalize(composed) - normalize(sg(teacher_whole)))^2``."""
    c = F.normalize(at_least_float32(composed), dim=-1)
    t = F.normalize(at_least_float32(teacher_whole.detach()), dim=-1).to(c.dtype)
    return (c - t).pow(2).mean(-1)


def decomposability_loss(decomposed: Tensor, teacher_parts: tuple[Tensor, ...]) -> Tensor:
    """``[B]``: the decomposed whole ``[B, n * D]`` is normalised as one vector (the authors'
    ``normalize(dim=1)`` on the concatenation), cut into ``n`` chunks of ``D``, and each chunk
    compared with its normalised, detached teacher part: ``mean_i mean_d (chunk_i -
    normalize(sg(t_i)))^2``."""
    n = len(teacher_parts)
    d = F.normalize(at_least_float32(decomposed), dim=-1)
    chunks = d.view(d.shape[0], n, -1)
    t = torch.stack([F.normalize(at_least_float32(p.detach()), dim=-1) for p in teacher_parts], 1)
    return (chunks - t.to(d.dtype)).pow(2).mean((1, 2))


class PartWholeComposability(Objective):
    """``Views.embeddings``: the student's embedding of the whole image (view 0) and of its
    ``n_parts`` parts (views ``1..n``, e.g. the quadrants of the whole, each resized to the whole's
    size), each ``[B, dim]``; ``Views.extras[keys.TEACHER]``: a momentum teacher's (the ``ema``
    teacher) on the same views. The composer (``n * dim -> dim``, ReLU, ``dim -> dim``) maps the
    concatenated student parts to the whole, compared with the teacher's whole; the decomposer
    (``dim -> dim``, ReLU, ``dim -> n * dim``) maps the student's whole to the parts, compared with
    the teacher's parts (:func:`composability_loss`, :func:`decomposability_loss`). Loss:
    ``composability_weight * L_c + decomposability_weight * L_d``, per sample (no batch
    coupling); the teacher receives no gradient."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = False

    def __init__(self, dim: Annotated[int, Ge(1)] = 64, n_parts: Annotated[int, Ge(1)] = 4,
                 composability_weight: Annotated[float, Ge(0)] = 1.0,
                 decomposability_weight: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.dim, self.n_parts = dim, n_parts
        self.composability_weight = composability_weight
        self.decomposability_weight = decomposability_weight
        self.composer = nn.Sequential(nn.Linear(n_parts * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.decomposer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, n_parts * dim))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'part_whole_composability'"
        if views.n_views != 1 + self.n_parts:
            raise ShapeError(f"{owner}: needs the whole and its n_parts={self.n_parts} parts, "
                             f"{1 + self.n_parts} views, got {views.n_views}")
        whole, *parts = views.embeddings
        if whole.shape[1] != self.dim:
            raise ShapeError(f"{owner}: Views.embeddings must be [B, dim={self.dim}], got "
                             f"{list(whole.shape)}")
        teacher = check_teacher(owner, views)
        dtype = self.composer[0].weight.dtype
        student = [z if torch.is_autocast_enabled(z.device.type) else z.to(dtype)
                   for z in (whole, *parts)]
        composed = self.composer(torch.cat(student[1:], dim=1))
        decomposed = self.decomposer(student[0])
        l_c = composability_loss(composed, teacher[0])
        l_d = decomposability_loss(decomposed, teacher[1:])
        per_sample = self.composability_weight * l_c + self.decomposability_weight * l_d
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"composability": l_c.mean().detach(),
                          "decomposability": l_d.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """The whole and its ``n_parts`` parts, ``[B, dim]`` each, and the teacher's on each."""
        n = 1 + self.n_parts
        s = tuple(torch.randn(batch_size, self.dim, generator=generator).requires_grad_()
                  for _ in range(n))
        t = tuple(torch.randn(batch_size, self.dim, generator=generator) for _ in range(n))
        return Views(embeddings=s, extras={keys.TEACHER: t}), Batch()


CARD = Card(
    name="part_whole_composability", kind="objective",
    title="Representing Part-Whole Hierarchies in Foundation Models by Learning Localizability, "
          "Composability, and Decomposability from Anatomy via Self-Supervision (Adam-v2)",
    paper="arXiv:2404.15672",
    summary="Part-whole hierarchy: a composer predicts the teacher's embedding of a whole image "
            "from the student's embeddings of its parts, and a decomposer predicts the "
            "teacher's part embeddings from the student's whole; squared error on L2-normalised "
            "embeddings.",
    formula="L_c = mean_d (n(C([s_p1; ...; s_pn])) - n(sg(t_w)))^2, C = Linear(nD, D) ReLU "
            "Linear(D, D); u = n(Dec(s_w)) over all nD values, Dec = Linear(D, D) ReLU "
            "Linear(D, nD); L_d = mean_i mean_d (u_i - n(sg(t_pi)))^2; L = w_c L_c + w_d L_d, "
            "w_c = w_d = 1, n = 4 parts; n(x) = x / ||x||",
    left_out="The localizability term (DINO's self-distillation between a global crop and local "
             "crops) is the dino objective; compose it (dino + part_whole_composability, the "
             "paper's weights 1, 1, 1). The coarse-to-fine schedule of part granularity (whole "
             "image, then quadrants, then quadrants of quadrants), the chest X-ray corpora and "
             "the ConvNeXt-B backbone are not here; the parts are whatever views the user's "
             "transforms give (e.g. the quadrants of a digit). The embeddings are the encoder's "
             "output (the authors compose backbone features, before the localizability head). "
             "Following the authors' code, the decomposer's output is normalised as one vector "
             "before it is cut into parts. The seed entry's 'whole = mean of parts' is not the "
             "method: the composition is a learned head over the concatenated parts.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PartWholeComposability, card=CARD)
