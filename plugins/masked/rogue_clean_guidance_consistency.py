"""ROGUE: a network made robust to occlusion by matching, on an occluded input, what a frozen
network trained on clean inputs predicts for the clean input (the guidance), at the output and
at the feature level.

Tiwari, Chen, Tsai, Kuo, Chen, Jou, Venkatesh and Chen, "Self-Supervised Robustifying Guidance
for Monocular 3D Face Reconstruction", BMVC 2022 (arXiv:2112.14382).

The transform makes the occluded view: one axis-aligned rectangle per sample covering a uniform
fraction of the image, filled with a constant or pasted from another sample of the batch. The
objective takes view 0 as the clean input and every further view as an occluded copy of it:

    L_i = mean_{v >= 1} ( ||f_s(x_i^v) - sg f_t(x_i^0)||^2 + lambda_f ||h(x_i^v) - sg h(x_i^0)||^2 )

with ``f_t`` the frozen guidance network (a :class:`sdk.classification.FrozenTeacher`), ``f_s``
the network being trained (initialised from ``f_t``) and ``h`` its backbone features.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.masking import as_image, image_grid
from sdk.types import Batch, Loss, Views

NAME = "rogue_clean_guidance_consistency"
ASPECT = 2.0
"""The rectangle's height-to-width ratio is log-uniform in ``[1 / ASPECT, ASPECT]``."""


def occlusion_rectangles(batch: int, height: int, width: int, min_fraction: float,
                         max_fraction: float, *, device: torch.device | str | None = None) -> Tensor:
    """``[B, H, W]`` bool: one rectangle per sample, its area a uniform fraction ``a`` in
    ``[min_fraction, max_fraction]`` of the image (rounded to whole pixels), its aspect ratio
    log-uniform in ``[1/2, 2]``, its position uniform over the positions where it fits."""
    u = torch.rand(batch, 4, device=device)
    area = (min_fraction + (max_fraction - min_fraction) * u[:, 0]) * (height * width)
    ratio = torch.exp((2 * u[:, 1] - 1) * math.log(ASPECT))
    rows = torch.round(torch.sqrt(area * ratio / (height * width)) * height).clamp(1, height)
    cols = torch.round(area / rows).clamp(1, width)
    top = torch.floor(u[:, 2] * (height - rows + 1))
    left = torch.floor(u[:, 3] * (width - cols + 1))
    r = torch.arange(height, device=device, dtype=area.dtype)
    c = torch.arange(width, device=device, dtype=area.dtype)
    in_rows = (r >= top[:, None]) & (r < (top + rows)[:, None])
    in_cols = (c >= left[:, None]) & (c < (left + cols)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


class RogueOcclusion(Transform):
    """The occluded view: ``x`` (images ``[B, C, H, W]`` or flat ``[B, C*H*W]``) with one
    :func:`occlusion_rectangles` rectangle per sample covering ``[min_fraction, max_fraction]``
    of the image (the catalogue's 10-40%), every channel set to ``fill``, or, with
    ``paste=True``, to the same pixels of another sample of the batch (drawn uniformly among
    the others: a synthetic occluder of natural content). Returns ``x``'s shape."""

    def __init__(self, image_shape: tuple[int, int, int] | list[int] = (1, 8, 8),
                 min_fraction: Annotated[float, Interval(gt=0, le=1)] = 0.1,
                 max_fraction: Annotated[float, Interval(gt=0, le=1)] = 0.4,
                 fill: float = 0.0, paste: bool = False):
        super().__init__()
        if min_fraction > max_fraction:
            raise ConfigError(f"{NAME}: min_fraction {min_fraction} exceeds max_fraction "
                              f"{max_fraction}", param="min_fraction")
        self.image_shape = tuple(int(s) for s in image_shape)
        image_grid(NAME, self.image_shape, 1)
        self.min_fraction, self.max_fraction = min_fraction, max_fraction
        self.fill, self.paste = fill, paste

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        owner = f"transform {NAME!r}"
        img = as_image(owner, x, self.image_shape)
        b, _, h, w = img.shape
        if not img.is_floating_point():
            raise ShapeError(f"{owner}: x must be floating images, got {img.dtype}")
        if self.paste and b < 2:
            raise ShapeError(f"{owner}: paste=True pastes another sample's pixels, so the batch "
                             f"needs at least 2 rows, got x {list(x.shape)}")
        mask = occlusion_rectangles(b, h, w, self.min_fraction, self.max_fraction,
                                    device=img.device)[:, None]
        if self.paste:
            source = (torch.arange(b, device=img.device)
                      + torch.randint(1, b, (b,), device=img.device)) % b
            occluder = img[source]
        else:
            occluder = torch.full_like(img, self.fill)
        return torch.where(mask, occluder, img).reshape(x.shape), batch

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        return (torch.rand(batch_size, *self.image_shape, generator=generator),
                Batch(index=torch.arange(batch_size)))


def _pair(owner: str, field: str, entry: object, views: int) -> tuple[Tensor, ...]:
    if not isinstance(entry, (tuple, list)) or len(entry) < views:
        raise ShapeError(f"{owner}: {field} must hold one tensor per view ({views}: the clean "
                         f"view first, then the occluded ones), got "
                         f"{len(entry) if isinstance(entry, (tuple, list)) else type(entry).__name__}")
    return tuple(entry)


def _check(owner: str, field: str, t: object, shape: tuple[int, ...] | None) -> Tensor:
    ok = (isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 2
          and (shape is None or tuple(t.shape) == shape))
    if not ok:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        want = f"[{shape[0]}, {shape[1]}]" if shape is not None else "[B, D]"
        raise ShapeError(f"{owner}: {field} must be floating {want}, got {got}")
    return t


def guidance_consistency(student: Tensor, guidance: Tensor, features: Tensor,
                         clean_features: Tensor, feature_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(coefficient, feature)`` per-sample terms ``||s - sg g||^2`` and ``lambda_f ||h - sg
    h_0||^2`` (sums over the last dimension): ``student``, ``features`` from the occluded view,
    ``guidance`` (the frozen network's output) and ``clean_features`` from the clean view, both
    detached."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    coefficient = (student.to(dtype) - guidance.detach().to(dtype)).square().sum(-1)
    feature = (features.to(dtype) - clean_features.detach().to(dtype)).square().sum(-1)
    return coefficient, feature_weight * feature


class RogueCleanGuidanceConsistency(Objective):
    """View 0 is the clean input (no transform), views ``1..V-1`` its occluded copies
    (:class:`RogueOcclusion`). The coefficient term matches the trained network's output on
    each occluded view, ``Views.embeddings[v]`` ``[B, D]``, to the frozen guidance network's
    output on the clean view, ``Views.extras[keys.TEACHER][0]`` ``[B, D]`` (a FrozenTeacher of
    the network trained on clean inputs; detached); the feature term, weighted
    ``feature_weight``, matches the backbone features of each occluded view,
    ``Views.extras[keys.FEATURES][v]`` ``[B, F]``, to the clean view's, ``[0]``, detached. The
    per-sample loss is the mean of both over the occluded views; the network's own output on
    the clean view, ``Views.embeddings[0]``, is not a term (the guidance is the target there)."""

    requires = {"views": 2, "extras": (keys.TEACHER, keys.FEATURES)}
    consumes = frozenset()
    batch_coupled = False

    def __init__(self, feature_weight: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.feature_weight = feature_weight

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {NAME!r}"
        n = len(views.embeddings)
        if n < 2:
            raise ShapeError(f"{owner}: needs the clean view and at least one occluded view, got "
                             f"{n} view(s)")
        teacher = _pair(owner, f"Views.extras[{keys.TEACHER!r}]", views.extras[keys.TEACHER], n)
        feats = _pair(owner, f"Views.extras[{keys.FEATURES!r}]", views.extras[keys.FEATURES], n)
        first = _check(owner, "Views.embeddings[1]", views.embeddings[1], None)
        shape = tuple(first.shape)
        guidance = _check(owner, f"Views.extras[{keys.TEACHER!r}][0] (the guidance on the clean "
                          "view, as the embeddings)", teacher[0], shape)
        clean = _check(owner, f"Views.extras[{keys.FEATURES!r}][0]", feats[0], None)
        if clean.shape[0] != shape[0]:
            raise ShapeError(f"{owner}: Views.extras[{keys.FEATURES!r}][0] has {clean.shape[0]} "
                             f"rows, the embeddings {shape[0]}")
        coefficient = feature = 0.0
        for v in range(1, n):
            s = _check(owner, f"Views.embeddings[{v}]", views.embeddings[v], shape)
            h = _check(owner, f"Views.extras[{keys.FEATURES!r}][{v}]", feats[v], tuple(clean.shape))
            c, f = guidance_consistency(s, guidance, h, clean, self.feature_weight)
            coefficient, feature = coefficient + c, feature + f
        coefficient, feature = coefficient / (n - 1), feature / (n - 1)
        per_sample = coefficient + feature
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"coefficient": coefficient.mean().detach(),
                          "feature": feature.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        # the clean view's output and features are targets only (detached): no gradient reaches them
        out = (torch.randn(batch_size, 6, generator=generator),
               torch.randn(batch_size, 6, generator=generator).requires_grad_())
        feats = (torch.randn(batch_size, 5, generator=generator),
                 torch.randn(batch_size, 5, generator=generator).requires_grad_())
        teacher = tuple(torch.randn(batch_size, 6, generator=generator) for _ in range(2))
        views = Views(embeddings=out, extras={keys.TEACHER: teacher, keys.FEATURES: feats})
        return views, Batch(index=torch.arange(batch_size))


TRANSFORM_CARD = Card(
    name=NAME, kind="transform",
    title="Self-Supervised Robustifying Guidance for Monocular 3D Face Reconstruction (ROGUE)",
    paper="arXiv:2112.14382",
    summary="The occluded view of ROGUE's robustification pipeline: one rectangle per sample "
            "covering a uniform 10-40% of the image, filled with a constant or pasted from "
            "another sample of the batch.",
    formula="a ~ U[min_fraction, max_fraction], aspect ~ logU[1/2, 2], position uniform; "
            "x_occ = where(rect, fill or x_j (j != i drawn uniformly), x)",
    left_out="Only the abstract (and a catalogue summary) could be read; the paper's method "
             "section and code were not reachable. The 10-40% range is the catalogue's, the "
             "rectangle shape, aspect range and paste-from-batch occluder are generic stand-ins "
             "for the paper's synthetic occlusions (pasted objects on faces, SynChOcc) and real "
             "ones (ReaChOcc), which are not here. Noise corruption (the abstract's noisy faces) "
             "is any noise transform put in this one's place.",
)

CARD = Card(
    name=NAME, kind="objective",
    title="Self-Supervised Robustifying Guidance for Monocular 3D Face Reconstruction (ROGUE)",
    paper="arXiv:2112.14382",
    summary="A frozen guidance network trained on clean inputs gives the target on the clean "
            "view; the network being robustified (initialised from it) must reproduce that "
            "output, and its own clean-view features, from an occluded copy of the input.",
    formula="L_i = mean_{v>=1} ||f_s(x_i^v) - sg f_t(x_i^0)||^2 + lambda_f ||h(x_i^v) - "
            "sg h(x_i^0)||^2; lambda_f = feature_weight = 1; L = mean_i L_i",
    left_out="Only the abstract could be read (arXiv:2112.14382's method section and any code "
             "were not reachable); the loss is what the abstract states: consistency between "
             "the coefficients estimated for occluded inputs and the clean counterpart's, plus "
             "a feature-level term. Their exact form, norms and weights are not the paper's: "
             "squared L2 sums, lambda_f = 1 (the catalogue's), and the feature target is the "
             "trained network's own clean-view backbone features, detached (the frozen "
             "network's features are not among the objective's inputs). The abstract's "
             "image-level loss needs the 3D morphable face model and differentiable renderer "
             "(photometric, landmark and perceptual losses), which are not here; nor are the "
             "guidance stage's own training, the face datasets (CelebA, ReaChOcc, SynChOcc) or "
             "an optional task loss on clean inputs (add one with the objective algebra).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RogueOcclusion, card=TRANSFORM_CARD)
    registry.add(RogueCleanGuidanceConsistency, card=CARD)
