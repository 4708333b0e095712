"""GLARE: continual self-supervised pre-training with global, local and regional consistency
between a student and its momentum teacher. Global: DINO's cross-view cross-entropy on the
image-level outputs; local: the same on corresponding patches (the student's under patch-level
augmentation); regional: the same on region-pooled patch outputs, the regions found by
clustering the teacher's patches.

Ebouky, Chhatkuli, Malossi, Studer, Assaf and Bartezzaghi, "Enhancing Semantic Segmentation with
Continual Self-Supervised Pre-training" (arXiv:2509.17816).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import Center, at_least_float32, check_teacher
from sdk.types import Batch, Loss, Views

NAME = "glare_regional_consistency"
OWNER = f"objective {NAME!r}"


def dino_cross_entropy(student: Tensor, teacher: Tensor, student_temp: float,
                       teacher_temp: float) -> Tensor:
    """``-sum_k softmax(teacher / t_t)_k log softmax(student / t_s)_k`` over the last dimension,
    the teacher detached (centre it first)."""
    p_t = torch.softmax(at_least_float32(teacher.detach()) / teacher_temp, dim=-1)
    return -(p_t * torch.log_softmax(at_least_float32(student) / student_temp, dim=-1)).sum(-1)


def kmeans_regions(x: Tensor, regions: int, iterations: int) -> Tensor:
    """``[B, P]``: each patch's region among ``regions`` clusters of the rows ``x [B, P, D]``
    (per image, no gradient). Farthest-point initialisation (the patch farthest from the mean,
    then each next one farthest from those chosen), so the result does not depend on the order
    of the patches; then ``iterations`` Lloyd steps."""
    x = at_least_float32(x.detach())
    b, p, _ = x.shape
    rows = torch.arange(b, device=x.device)
    gap = (x - x.mean(1, keepdim=True)).pow(2).sum(-1)  # [B, P]
    centres = []
    for _ in range(regions):
        pick = gap.argmax(1)
        c = x[rows, pick]
        centres.append(c)
        gap = torch.minimum(gap if len(centres) > 1 else torch.full_like(gap, float("inf")),
                            (x - c[:, None]).pow(2).sum(-1))
    c = torch.stack(centres, 1)  # [B, R, D]
    assign = torch.cdist(x, c).argmin(-1)
    for _ in range(iterations):
        one_hot = F.one_hot(assign, regions).to(x.dtype)  # [B, P, R]
        count = one_hot.sum(1)[..., None]
        c = torch.where(count > 0, one_hot.transpose(1, 2) @ x / count.clamp_min(1), c)
        assign = torch.cdist(x, c).argmin(-1)
    return assign


def region_pool(x: Tensor, assign: Tensor, regions: int) -> tuple[Tensor, Tensor]:
    """``(pooled [B, R, D], present [B, R])``: the mean of each region's patches of ``x``."""
    one_hot = F.one_hot(assign, regions).to(x.dtype)
    count = one_hot.sum(1)
    return one_hot.transpose(1, 2) @ x / count.clamp_min(1)[..., None], count > 0


class GlareRegionalConsistency(Objective):
    """Student head outputs of two views ``Views.embeddings`` ``[B, K]``, the momentum teacher's
    ``Views.extras[keys.TEACHER]`` (one ``[B, K]`` per view) and the patch outputs
    ``Views.extras[keys.PATCHES] = (student [B, P, K], teacher [B, P, K])``, row ``p`` of both
    the same image location (the student's seen under patch-level augmentation). Loss per image:
    ``global_weight * L_g + local_weight * L_l + region_weight * L_r`` with

    * ``L_g``: :func:`dino_cross_entropy` of each view's student against the other view's
      centred teacher, averaged over the two pairs;
    * ``L_l``: the same per patch against the centred teacher patch, averaged over patches;
    * ``L_r``: the same per region (:func:`kmeans_regions` of the teacher patches, ``regions``
      clusters, both sides mean-pooled by :func:`region_pool`), averaged over present regions.

    Two centres (:class:`sdk.ssl.Center`, momentum ``center_momentum``): the image-level one and
    the patch one (shared by local and regional terms), updated after every training forward
    (all-reduced under DDP when ``gather``)."""

    requires = {"views": 2, "extras": (keys.TEACHER, keys.PATCHES)}
    batch_coupled = True

    def __init__(self, student_temp: Annotated[float, Gt(0)] = 0.1,
                 teacher_temp: Annotated[float, Gt(0)] = 0.04,
                 center_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.9,
                 regions: Annotated[int, Ge(1)] = 4, kmeans_iterations: Annotated[int, Ge(0)] = 10,
                 global_weight: Annotated[float, Ge(0)] = 1.0,
                 local_weight: Annotated[float, Ge(0)] = 1.0,
                 region_weight: Annotated[float, Ge(0)] = 1.0, gather: Gather = "auto"):
        super().__init__()
        self.student_temp, self.teacher_temp, self.gather = student_temp, teacher_temp, gather
        self.regions, self.kmeans_iterations = regions, kmeans_iterations
        self.weights = (global_weight, local_weight, region_weight)
        self.center = Center(center_momentum, owner=OWNER)
        self.patch_center = Center(center_momentum, owner=OWNER)

    def forward(self, views: Views, batch: Batch) -> Loss:
        if views.n_views != 2:
            raise ShapeError(f"{OWNER}: needs exactly two views, got {views.n_views}")
        t1, t2 = check_teacher(OWNER, views)
        s1, s2 = views.embeddings
        pair = views.extras[keys.PATCHES]
        b, k = s1.shape
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(x, Tensor) and x.is_floating_point() for x in pair)
                or pair[0].dim() != 3 or pair[0].shape != pair[1].shape
                or pair[0].shape[0] != b or pair[0].shape[2] != k):
            got = [list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                   for x in (pair if isinstance(pair, (tuple, list)) else [pair])]
            raise ShapeError(f"{OWNER}: Views.extras[{keys.PATCHES!r}] must be (student, teacher) "
                             f"patch outputs, floating [{b}, P, {k}] each, got {got}")
        ps, pt = pair[0], pair[1].detach()
        self.center.check(k)
        self.patch_center.check(k)
        ce = lambda s, t: dino_cross_entropy(s, t, self.student_temp, self.teacher_temp)  # noqa: E731
        global_term = 0.5 * (ce(s1, self.center(t2)) + ce(s2, self.center(t1)))
        local_term = ce(ps, self.patch_center(pt)).mean(1)
        assign = kmeans_regions(pt, min(self.regions, pt.shape[1]), self.kmeans_iterations)
        r = min(self.regions, pt.shape[1])
        pooled_s, present = region_pool(at_least_float32(ps), assign, r)
        pooled_t, _ = region_pool(at_least_float32(pt), assign, r)
        per_region = ce(pooled_s, self.patch_center(pooled_t))
        region_term = (per_region * present).sum(1) / present.sum(1)
        wg, wl, wr = self.weights
        per_sample = wg * global_term + wl * local_term + wr * region_term
        if self.training:
            all_reduce = resolve_gather(self.gather)
            self.center.update(torch.cat([t1, t2]), all_reduce=all_reduce)
            self.patch_center.update(pt, all_reduce=all_reduce)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"global": global_term.mean().detach(), "local": local_term.mean().detach(),
                          "regional": region_term.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of 8 output dimensions and 6 patches per image."""
        s = tuple(torch.randn(batch_size, 8, generator=generator).requires_grad_() for _ in range(2))
        t = tuple(torch.randn(batch_size, 8, generator=generator) for _ in range(2))
        ps = torch.randn(batch_size, 6, 8, generator=generator).requires_grad_()
        pt = torch.randn(batch_size, 6, 8, generator=generator)
        return (Views(embeddings=s, extras={keys.TEACHER: t, keys.PATCHES: (ps, pt)}),
                Batch(index=torch.arange(batch_size)))


CARD = Card(
    name=NAME, kind="objective",
    title="Enhancing Semantic Segmentation with Continual Self-Supervised Pre-training (GLARE)",
    paper="arXiv:2509.17816",
    summary="Global, local and regional consistency between a student and its momentum teacher: "
            "DINO's centred cross-entropy on the image-level outputs across views, on "
            "corresponding patches, and on region-pooled patches (regions: k-means of the "
            "teacher's patches).",
    formula="CE(s, t) = -sum softmax((t - c)/0.04) log softmax(s/0.1); L_g = (CE(s1, t2) + "
            "CE(s2, t1))/2; L_l = mean_p CE(s_p, t_p); regions = kmeans_R(t_p), R = 4; L_r = "
            "mean_r CE(mean_{p in r} s_p, mean_{p in r} t_p); L = L_g + L_l + L_r; c <- 0.9 c + "
            "0.1 mean(t)",
    left_out="From the abstract and public summaries only (the method section was not reachable "
             "here): the three consistency levels, the momentum teacher and the patch-level "
             "augmentations are confirmed; the region construction (a summary speaks of "
             "attention-guided region sampling; here k-means of the teacher's patch outputs, R = "
             "4, farthest-point initialisation, 10 Lloyd steps), the equal weights, the "
             "temperatures 0.04 / 0.1 (DINO's) and the centring of the patch terms are not "
             "checked against the paper. The UniAdapter adapters, the frozen ViT backbone with "
             "SSL weights, the patch-level augmentations themselves (blurring) and the "
             "segmentation benchmarks are not here; any encoder giving image-level and patch "
             "outputs serves.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GlareRegionalConsistency, card=CARD)
