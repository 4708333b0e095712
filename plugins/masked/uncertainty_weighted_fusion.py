"""ProDepth: a static-scene probability from the disagreement of single-frame and multi-frame
depth, which fuses the cost volume's depth distribution with a Gaussian around the single-frame
depth (Probabilistic Cost Volume Modulation) and reweights the self-supervised loss.

Woo, Lee, Kim, Lee and Lee, "ProDepth: Boosting Self-Supervised Multi-Frame Monocular Depth with
Probabilistic Fusion", ECCV 2024 (arXiv:2407.09303); the formulas follow the authors' code.
Disparities are sigmoid outputs ``sigma``, mapped as in Monodepth2 to ``s = 1 / d_max + (1 /
d_min - 1 / d_max) sigma`` and depth ``D = 1 / s``. The static probability of a pixel is
``w = exp(-2/3 |D_cv - D_mono|) exp(-2/3 |s_cv - s_mono|)`` (``cv``: the auxiliary decoder on
the cost volume, ``mono``: the single-frame network); pixels with ``w <= 0.4`` count as dynamic.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

NAME = "uncertainty_weighted_fusion"
REPROJECTION_ERROR = "reprojection_error"
"""``Views.extras``: the per-pixel photometric reprojection error of the multi-frame depth
``[B, N]`` (the minimum over source frames; differentiable through the user's warping)."""
MONO_DISPARITY = "mono_disparity"
"""``Views.extras``: the single-frame network's sigmoid disparity ``[B, N]`` (detached here)."""
MATCHING_DISPARITY = "matching_disparity"
"""``Views.extras``: the cost-volume decoder's sigmoid disparity ``[B, N]`` (detached here)."""
EPS = 1e-7
"""The authors' floor in min-max normalisations and in the masked mean's denominator."""


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def disp_to_depth(disp: Tensor, min_depth: float = 0.1, max_depth: float = 100.0
                  ) -> tuple[Tensor, Tensor]:
    """``(s, D)``: the scaled disparity ``1 / max_depth + (1 / min_depth - 1 / max_depth) disp``
    of a sigmoid output ``disp`` and its depth ``1 / s``."""
    s = 1 / max_depth + (1 / min_depth - 1 / max_depth) * disp
    return s, 1 / s


def static_weight(mono_disp: Tensor, matching_disp: Tensor, min_depth: float = 0.1,
                  max_depth: float = 100.0, scale: float = 2 / 3, threshold: float = 0.4
                  ) -> tuple[Tensor, Tensor]:
    """``(w, static)``: ``w = exp(-scale |D_cv - D_mono|) exp(-scale |s_cv - s_mono|)`` (1:
    static, towards 0: moving) and the float mask ``static = 1[w > threshold]``."""
    s_mono, d_mono = disp_to_depth(mono_disp, min_depth, max_depth)
    s_cv, d_cv = disp_to_depth(matching_disp, min_depth, max_depth)
    w = torch.exp(-scale * (d_cv - d_mono).abs()) * torch.exp(-scale * (s_cv - s_mono).abs())
    return w, (w > threshold).to(w.dtype)


def _minmax(p: Tensor) -> Tensor:
    """Min-max normalisation over the hypotheses (dim 1) of each pixel."""
    lo, hi = p.amin(1, keepdim=True), p.amax(1, keepdim=True)
    return (p - lo) / (hi - lo + EPS)


def fuse_distributions(cost: Tensor, bins: Tensor, mono_depth: Tensor, sigma: Tensor, w: Tensor,
                       static: Tensor) -> tuple[Tensor, Tensor]:
    """``(refined_cost, fused)``, each ``[B, K, H, W]``: Probabilistic Cost Volume Modulation.
    The cost volume ``cost [B, K, H, W]`` (low = good match) over depth hypotheses ``bins [K]``
    gives ``P_cv = mm(softmax_k(-mm(cost)))``; the single-frame depth ``mono_depth [B, 1, H, W]``
    with standard deviation ``sigma`` gives ``P_mono = mm(N(bins; mono_depth, sigma^2))``
    (``mm``: min-max normalisation over ``k``). Dynamic pixels (``static = 0``) take ``fused =
    P_cv^w P_mono^(1 - w)``, static ones ``P_cv``; the refined cost maps ``fused`` back to the
    cost range of each pixel, reversed: ``(max fused - fused) / (max - min) (max c - min c) +
    min c``."""
    c_lo, c_hi = cost.amin(1, keepdim=True), cost.amax(1, keepdim=True)
    p_cv = _minmax(torch.softmax(-_minmax(cost), dim=1))
    d = bins.view(1, -1, 1, 1).to(cost)
    gauss = torch.exp(-(d - mono_depth) ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    p_mono = _minmax(gauss)
    fused = static * p_cv + (1 - static) * p_cv.pow(w) * p_mono.pow(1 - w)
    f_lo, f_hi = fused.amin(1, keepdim=True), fused.amax(1, keepdim=True)
    refined = (f_hi - fused) / (f_hi - f_lo + EPS) * (c_hi - c_lo) + c_lo
    return refined, fused


def reweighted_loss(multi_disp: Tensor, reprojection: Tensor, mono_disp: Tensor, mask: Tensor,
                    min_depth: float = 0.1, max_depth: float = 100.0,
                    consistency_weight: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """``(per_sample, reprojection_term, consistency_term)``, each ``[B]``, over ``[B, N]``
    pixels: ``sum_p m_p e_p / (sum_p m_p + 1e-7) + consistency_weight mean_p (1 - m_p) |s_multi -
    sg(s_mono)|``, ``m = w 1[w > threshold]`` the soft static mask, ``e`` the reprojection error,
    ``s`` scaled disparities (:func:`disp_to_depth`)."""
    s_multi, _ = disp_to_depth(multi_disp, min_depth, max_depth)
    s_mono, _ = disp_to_depth(mono_disp.detach(), min_depth, max_depth)
    rep = (mask * reprojection).sum(1) / (mask.sum(1) + EPS)
    cons = ((1 - mask) * (s_multi - s_mono).abs()).mean(1)
    return rep + consistency_weight * cons, rep, cons


class UncertaintyWeightedFusion(Objective):
    """The multi-frame network's sigmoid disparity ``Views.embeddings[0]`` ``[B, N]`` (``N``
    pixels), its photometric reprojection error ``Views.extras["reprojection_error"]`` ``[B,
    N]``, and the single-frame and cost-volume decoders' disparities
    ``Views.extras["mono_disparity"]``, ``Views.extras["matching_disparity"]`` ``[B, N]`` (both
    detached): the static mask ``m = w 1[w > threshold]`` (:func:`static_weight`) keeps the
    reprojection loss on static pixels and pulls the multi-frame disparity towards the
    single-frame one elsewhere (:func:`reweighted_loss`). :meth:`modulate` is the same weight's
    cost-volume fusion (:func:`fuse_distributions`), for the user's multi-frame encoder."""

    requires = {"views": 1, "extras": (REPROJECTION_ERROR, MONO_DISPARITY, MATCHING_DISPARITY)}
    batch_coupled = False

    def __init__(self, min_depth: Annotated[float, Gt(0)] = 0.1,
                 max_depth: Annotated[float, Gt(0)] = 100.0, scale: Annotated[float, Gt(0)] = 2 / 3,
                 threshold: Annotated[float, Interval(ge=0, lt=1)] = 0.4,
                 consistency_weight: Annotated[float, Ge(0)] = 0.1):
        super().__init__()
        if not max_depth > min_depth:
            raise ConfigError(f"{NAME}: max_depth must exceed min_depth, got min_depth={min_depth}, "
                              f"max_depth={max_depth}", param="max_depth")
        self.min_depth, self.max_depth, self.scale = min_depth, max_depth, scale
        self.threshold, self.consistency_weight = threshold, consistency_weight

    def weight(self, mono_disp: Tensor, matching_disp: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, static)`` of :func:`static_weight` with this objective's parameters."""
        return static_weight(mono_disp, matching_disp, self.min_depth, self.max_depth, self.scale,
                             self.threshold)

    def modulate(self, cost: Tensor, bins: Tensor, mono_disp: Tensor, sigma: Tensor,
                 matching_disp: Tensor) -> tuple[Tensor, Tensor]:
        """``(refined_cost, fused)`` of :func:`fuse_distributions` for a cost volume ``[B, K, H,
        W]`` and sigmoid disparities ``[B, 1, H, W]`` at its resolution (detached), ``sigma``
        the single-frame depth's standard deviation (the authors: 20 x a sigmoid output)."""
        if cost.dim() != 4 or bins.shape != (cost.shape[1],):
            raise ShapeError(f"{NAME}: modulate takes a cost volume [B, K, H, W] and K depth bins, "
                             f"got cost {list(cost.shape)} and bins {list(bins.shape)}")
        pixel = (cost.shape[0], 1, *cost.shape[2:])
        for field, t in (("mono_disp", mono_disp), ("sigma", sigma), ("matching_disp", matching_disp)):
            if t.shape != pixel:
                raise ShapeError(f"{NAME}: modulate's {field} must be {list(pixel)} (one value per "
                                 f"pixel of the cost volume), got {list(t.shape)}")
        mono_disp, matching_disp, sigma = mono_disp.detach(), matching_disp.detach(), sigma.detach()
        w, static = self.weight(mono_disp, matching_disp)
        _, mono_depth = disp_to_depth(mono_disp, self.min_depth, self.max_depth)
        return fuse_distributions(cost.detach(), bins, mono_depth, sigma, w, static)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {NAME!r}"
        disp = views.embeddings[0]
        fields = {}
        for key in (REPROJECTION_ERROR, MONO_DISPARITY, MATCHING_DISPARITY):
            t = views.extras.get(key, batch.extras.get(key))
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != disp.shape:
                shape = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"{owner}: extras[{key!r}] must be floating [B, N] = "
                                 f"{list(disp.shape)} (one value per pixel of Views.embeddings[0]), "
                                 f"got {shape}")
            fields[key] = _wide(t)
        w, static = self.weight(fields[MONO_DISPARITY].detach(), fields[MATCHING_DISPARITY].detach())
        mask = w * static
        per_sample, rep, cons = reweighted_loss(_wide(disp), fields[REPROJECTION_ERROR],
                                                fields[MONO_DISPARITY], mask, self.min_depth,
                                                self.max_depth, self.consistency_weight)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"reprojection": rep.mean().detach(), "consistency": cons.mean().detach(),
                          "static_fraction": static.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        n = 12
        disp = torch.rand(batch_size, n, generator=generator).requires_grad_()
        rep = torch.rand(batch_size, n, generator=generator).requires_grad_()
        mono = (disp.detach() + 0.01 * torch.randn(batch_size, n, generator=generator)).clamp(0, 1)
        matching = mono.clone()
        matching[:, ::3] = torch.rand(batch_size, (n + 2) // 3, generator=generator)  # "moving"
        views = Views(embeddings=(disp,), extras={REPROJECTION_ERROR: rep, MONO_DISPARITY: mono,
                                                  MATCHING_DISPARITY: matching})
        return views, Batch(index=torch.arange(batch_size))


CARD = Card(
    name=NAME, kind="objective",
    title="ProDepth: Boosting Self-Supervised Multi-Frame Monocular Depth with Probabilistic Fusion",
    paper="arXiv:2407.09303",
    summary="Static-scene probability from the disagreement of single-frame and cost-volume depth; "
            "it fuses the cost volume's depth distribution with a Gaussian around the "
            "single-frame depth where the scene moves, and keeps the reprojection loss on static "
            "pixels while pulling the multi-frame depth to the single-frame one elsewhere.",
    formula="s = 1/d_max + (1/d_min - 1/d_max) disp, D = 1/s; w = exp(-2/3 |D_cv - D_mono|) "
            "exp(-2/3 |s_cv - s_mono|), static = 1[w > 0.4], m = w static; "
            "L = mean_i [sum_p m e_p / (sum_p m + 1e-7) + 0.1 mean_p (1 - m) |s_multi - sg s_mono|]; "
            "PCVM: P_cv = mm(softmax_k(-mm(cost))), P_mono = mm(N(d_k; D_mono, sigma^2)), "
            "fused = static P_cv + (1 - static) P_cv^w P_mono^(1 - w)",
    left_out="The depth networks (Lite-Mono encoders, the cost-volume construction by warping, the "
             "uncertainty decoder giving sigma), the photometric reprojection error itself (SSIM + "
             "L1 after warping, the user's extras['reprojection_error']), the smoothness loss, the "
             "cost-volume decoder's own 0.3-weighted reprojection loss and the static-camera "
             "augmentation mask; KITTI/Cityscapes. The reprojection term is normalised per sample "
             "(the authors' sum runs over the whole batch). As in the authors' code the "
             "consistency term compares scaled disparities, not depths. modulate() gives the "
             "fused cost volume to the user's encoder (the paper feeds it to the depth decoder).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(UncertaintyWeightedFusion, card=CARD)
