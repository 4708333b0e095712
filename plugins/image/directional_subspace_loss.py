"""Directional subspace loss: adapt a generator to a hybrid of target domains by pulling the
embeddings of its images towards each domain's subspace, along the perpendicular from the source
generator's embedding.

Li, Liu, Xia, Lin, Zheng, Yang, Wang, Zhong, Ren and He, "Few-shot Hybrid Domain Adaptation of
Image Generators", ICLR 2024 (arXiv:2310.19378).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, MinLen
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

PLACEHOLDER_DOMAINS, PLACEHOLDER_SHOTS, PLACEHOLDER_WIDTH = 2, 10, 16
"""Without ``references``: this many domains of this many standard-normal rows of this width
stand in (seed 0), for shape checks only."""


def subspace_basis(references: Tensor, affine: bool = False) -> tuple[Tensor, Tensor]:
    """``(origin [D], U [D, K])`` of the subspace of one domain's reference embeddings
    ``[K, D]``: the span of the rows (``origin = 0``), or with ``affine`` the affine hull
    (``origin`` = their mean, spanned by the centred rows). ``U`` holds orthonormal columns for
    the numerically nonzero singular values (relative tolerance ``max(K, D) · eps``) and zero
    columns for the rest, so ``P e = origin + U Uᵀ (e - origin)`` is the least-squares projection."""
    refs = references.to(torch.promote_types(references.dtype, torch.float32))
    origin = refs.mean(0) if affine else torch.zeros_like(refs[0])
    u, s, _ = torch.linalg.svd((refs - origin).T, full_matrices=False)
    tol = max(refs.shape) * torch.finfo(refs.dtype).eps * s.max().clamp_min(torch.finfo(refs.dtype).tiny)
    return origin, u * (s > tol)


def project(e: Tensor, origin: Tensor, basis: Tensor) -> Tensor:
    """``P e = origin + U Uᵀ (e - origin)`` for embeddings ``e [B, D]`` and every domain's
    ``origin [N, D]`` and ``U [N, D, K]``: ``[N, B, D]``."""
    centred = e[None] - origin[:, None]
    return origin[:, None] + torch.einsum("ndk,nbk->nbd", basis, torch.einsum("ndk,nbd->nbk", basis, centred))


def directional_subspace_loss(adapted: Tensor, source: Tensor, origin: Tensor, basis: Tensor,
                              weights: Tensor, direction_weight: float = 1.0
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, distance, direction)``, each ``[B]``, for the adapted generator's embeddings
    ``e' [B, D]`` and the frozen source generator's ``e [B, D]`` of the same latents:
    ``distance = sum_d a_d |e' - P_d e'|^2``, ``direction = sum_d a_d (1 - cos(e' - e, P_d e - e))``,
    ``loss = distance + direction_weight · direction``. ``e`` is detached (the source is frozen)."""
    source = source.detach()
    dist = (adapted[None] - project(adapted, origin, basis)).pow(2).sum(-1)
    cos = F.cosine_similarity((adapted - source)[None], project(source, origin, basis) - source[None], dim=-1)
    w = weights[:, None]
    distance, direction = (w * dist).sum(0), (w * (1 - cos)).sum(0)
    return distance + direction_weight * direction, distance, direction


class DirectionalSubspaceLoss(Objective):
    """``L = mean_b [sum_d a_d |e'_b - P_d e'_b|^2 + lambda sum_d a_d (1 - cos(e'_b - e_b,
    P_d e_b - e_b))]``: the distance term blends the target domains by drawing the adapted
    generator's image embedding ``e'`` (``Views.embeddings[0]``) towards every domain's subspace;
    the direction term keeps the source's character by moving it along the perpendicular from
    the source embedding ``e`` (``Views.extras[keys.TEACHER][0]``, a frozen copy of the
    generator and encoder; detached) to each subspace. ``references``: one ``[K_d, D]`` array per
    target domain, the frozen encoder's embeddings of its few-shot images (without it, see
    :data:`PLACEHOLDER_DOMAINS`); ``weights`` ``a_d`` (normalised to sum 1; equal when None).
    Where ``e' = e`` (an adapted generator before its first step) the direction is undefined:
    cosine's ``eps`` gives it a large gradient along the wanted direction."""

    requires = {"views": 1, "extras": (keys.TEACHER,)}
    batch_coupled = False

    def __init__(self, references: Any = None,
                 weights: Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)] | None = None,
                 direction_weight: Annotated[float, Ge(0)] = 1.0, affine: bool = False):
        super().__init__()
        if references is None:
            g = torch.Generator().manual_seed(0)
            references = [torch.randn(PLACEHOLDER_SHOTS, PLACEHOLDER_WIDTH, generator=g)
                          for _ in range(PLACEHOLDER_DOMAINS)]
        refs = [torch.as_tensor(r) for r in (references if isinstance(references, Sequence)
                                             or (isinstance(references, Tensor) and references.dim() == 3)
                                             else [references])]
        if not refs or any(r.dim() != 2 or r.shape[0] < 1 or not r.is_floating_point()
                           or r.shape[1] != refs[0].shape[1] for r in refs):
            raise ConfigError("directional_subspace_loss: references must be one floating [K_d, D] "
                              "array per target domain, all of one width D, got "
                              f"{[f'{r.dtype} {list(r.shape)}' for r in refs]}", param="references")
        if weights is not None and len(weights) != len(refs):
            raise ConfigError(f"directional_subspace_loss: {len(weights)} weights for {len(refs)} "
                              "target domains", param="weights")
        origins, bases = zip(*(subspace_basis(r.detach(), affine) for r in refs))
        k = max(b.shape[1] for b in bases)
        self.register_buffer("origin", torch.stack(origins))
        self.register_buffer("basis", torch.stack([F.pad(b, (0, k - b.shape[1])) for b in bases]))
        w = torch.tensor(weights if weights is not None else [1.0] * len(refs))
        self.register_buffer("weights", w / w.sum())
        self.direction_weight, self.affine, self.dim = direction_weight, affine, refs[0].shape[1]

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'directional_subspace_loss'"
        adapted = views.embeddings[0]
        source = views.extras.get(keys.TEACHER, batch.extras.get(keys.TEACHER))
        source = source[0] if isinstance(source, (tuple, list)) else source
        if adapted.dim() != 2 or adapted.shape[1] != self.dim:
            raise ShapeError(f"{owner}: Views.embeddings[0] must be [B, {self.dim}] (the width of the "
                             f"references), got {list(adapted.shape)}")
        if not isinstance(source, Tensor) or source.shape != adapted.shape or not source.is_floating_point():
            shape = (f"{source.dtype} {list(source.shape)}" if isinstance(source, Tensor)
                     else type(source).__name__)
            raise ShapeError(f"{owner}: extras[{keys.TEACHER!r}][0] (the source generator's embeddings) "
                             f"must be floating {list(adapted.shape)} like Views.embeddings[0], got {shape}")
        dtype = torch.promote_types(adapted.dtype, torch.float32)
        origin, basis, weights = (t.to(dtype) for t in (self.origin, self.basis, self.weights))
        per_sample, distance, direction = directional_subspace_loss(
            adapted.to(dtype), source.to(dtype), origin, basis, weights, self.direction_weight)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"distance": distance.detach().mean(), "direction": direction.detach().mean()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        source = torch.randn(batch_size, self.dim, generator=generator)
        adapted = source + 0.1 * torch.randn(batch_size, self.dim, generator=generator)
        return (Views(embeddings=(adapted.requires_grad_(),), extras={keys.TEACHER: (source,)}),
                Batch(index=torch.arange(batch_size)))


CARD = Card(
    name="directional_subspace_loss", kind="objective",
    title="Few-shot Hybrid Domain Adaptation of Image Generators (directional subspace loss)",
    paper="arXiv:2310.19378",
    summary="Adapt a pretrained generator to a hybrid of several target domains known from a few "
            "images each, without a discriminator: embeddings of its images are drawn to every "
            "domain's subspace (spanned by the frozen encoder's embeddings of that domain's "
            "images) along the perpendicular from the source generator's embedding.",
    formula="P_d e = o_d + U_d U_dᵀ (e - o_d) (least-squares projection on domain d's subspace); "
            "L = sum_d a_d |e' - P_d e'|^2 + lambda sum_d a_d (1 - cos(e' - e, P_d e - e)), "
            "e' = E(G_t(z)), e = E(G_s(z)) (detached), a_d = 1/N, lambda = 1, o_d = 0",
    left_out="The StyleGAN2 generator, its adaptation schedule and the pretrained image encoder "
             "are not here: the loss takes their embeddings (the adapted generator's as the "
             "encoder output, the frozen source's as the teacher's). The paper's exact loss "
             "weights and whether its subspace is the span or the affine hull of the references "
             "could not be checked against the paper's text here: the span (o_d = 0), lambda = 1 "
             "and equal domain weights are the defaults, `affine=True` takes the hull around the "
             "references' mean. Semantic-similarity, FID and cross-domain-consistency evaluation "
             "are left out.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DirectionalSubspaceLoss, card=CARD)
