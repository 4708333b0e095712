"""Multi-scale structural similarity (MS-SSIM) as a training loss for image synthesis.

Snell, Ridgeway, Liao, Roads, Mozer and Zemel, "Learning to Generate Images with Perceptual
Similarity Metrics", ICIP 2017 (arXiv:1511.06409); the index is Wang, Simoncelli and Bovik,
"Multiscale structural similarity for image quality assessment", Asilomar 2003.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval, MinLen
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.imaging import image_pair
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Wang et al.'s exponents of scales 1 (finest) to 5."""

EPS = 1e-6
"""Per-scale terms are clamped at this floor before the fractional power (a negative structure
term has no real power; at exactly 0 the power's gradient is infinite)."""


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """The normalised 1-D Gaussian ``g_i ∝ exp(-(i - (size-1)/2)^2 / (2 sigma^2))``, ``[size]``;
    the 2-D window is its outer product with itself."""
    i = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(i ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Depthwise separable 'valid' filtering of ``[N, C, H, W]`` by the window ``g ⊗ g``."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_terms(x: Tensor, y: Tensor, window: Tensor, data_range: float = 1.0, k1: float = 0.01,
               k2: float = 0.03) -> tuple[Tensor, Tensor]:
    """``(ssim, cs)`` ``[B, C]``: the means over the valid window positions of
    ``l·cs`` and ``cs``, with ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` and
    ``cs = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)``, the local moments weighted by ``window``,
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = _blur(x, window), _blur(y, window)
    sxx = (_blur(x * x, window) - mx * mx).clamp_min(0)
    syy = (_blur(y * y, window) - my * my).clamp_min(0)
    sxy = _blur(x * y, window) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).mean((-2, -1)), cs.mean((-2, -1))


def fitting_scales(height: int, width: int, win_size: int, most: int = len(WEIGHTS)) -> int:
    """How many dyadic scales (at most ``most``) keep the ``win_size`` window inside the image:
    the largest ``M`` with ``min(H, W) // 2^(M-1) >= win_size`` (0 if none)."""
    side, m = min(height, width), 0
    while m < most and side // 2 ** m >= win_size:
        m += 1
    return m


def ms_ssim(x: Tensor, y: Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
            k1: float = 0.01, k2: float = 0.03, weights: tuple[float, ...] = WEIGHTS,
            scales: int | None = None) -> Tensor:
    """MS-SSIM of each image pair ``x, y [B, C, H, W]``, ``[B]``: per channel
    ``prod_{j<M} cs_j^{w_j} · ssim_M^{w_M}`` over ``M`` scales (2x2 average pooling between
    them), averaged over channels. ``scales=None`` takes all of ``weights`` that fit
    (:func:`fitting_scales`); with fewer than ``len(weights)`` scales the first ``M`` weights
    are renormalised to sum to 1 (one scale is SSIM). Computed in float32 (float64 kept)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    m = scales if scales is not None else fitting_scales(*x.shape[-2:], win_size, len(weights))
    w = torch.tensor(weights[:m], dtype=dtype, device=x.device)
    if m < len(weights):
        w = w / w.sum()
    g = gaussian_window(win_size, sigma, dtype, x.device)
    terms = []
    for j in range(m):
        if j:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        ssim, cs = ssim_terms(x, y, g, data_range, k1, k2)
        terms.append(ssim if j == m - 1 else cs)
    stacked = torch.stack(terms).clamp_min(EPS)
    return stacked.pow(w.view(-1, 1, 1)).prod(0).mean(1)


class MSSSIMLoss(Objective):
    """``L = (1 - l1_weight) (1 - MS-SSIM(x̂, x)) + l1_weight · mean|x̂ - x| / L``, averaged over
    the batch. The prediction ``x̂`` is the encoder's output ``Views.embeddings[0]`` (a decoder's
    image, ``[B, C·H·W]`` or ``[B, C, H, W]``); the reference ``x`` is
    ``Batch.extras[keys.INPUT]`` (the clean input of an autoencoder, the high-resolution image of
    super-resolution), ``[B, C, H, W]``, or flat rows when ``image_shape = (C, H, W)`` is given.
    Images need ``min(H, W) >= win_size``: 8x8 digits do not hold the 11-pixel window, so they
    need ``win_size <= 8`` (e.g. 7, one scale: SSIM on a 2x2 map of window positions)."""

    requires = {"views": 1, "extras": (keys.INPUT,)}
    batch_coupled = False

    def __init__(self, data_range: Annotated[float, Gt(0)] = 1.0,
                 win_size: Annotated[int, Ge(1)] = 11, sigma: Annotated[float, Gt(0)] = 1.5,
                 k1: Annotated[float, Gt(0)] = 0.01, k2: Annotated[float, Gt(0)] = 0.03,
                 weights: Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)] = WEIGHTS,
                 scales: Annotated[int | None, Ge(1)] = None,
                 image_shape: tuple[Annotated[int, Ge(1)], ...] | None = None,
                 l1_weight: Annotated[float, Interval(ge=0, le=1)] = 0.0):
        super().__init__()
        if scales is not None and scales > len(weights):
            raise ConfigError(f"ms_ssim_loss: scales={scales} exceeds the {len(weights)} weights",
                              param="scales")
        if image_shape is not None and len(image_shape) != 3:
            raise ConfigError(f"ms_ssim_loss: image_shape must be (C, H, W), got {image_shape}",
                              param="image_shape")
        self.data_range, self.win_size, self.sigma, self.k1, self.k2 = (
            data_range, win_size, sigma, k1, k2)
        self.weights, self.scales, self.l1_weight = tuple(weights), scales, l1_weight
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def _images(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        owner = "objective 'ms_ssim_loss'"
        pred, target = image_pair(owner, pred, target, self.image_shape)
        h, w = target.shape[2:]
        fit = fitting_scales(h, w, self.win_size, len(self.weights))
        if fit == 0 or (self.scales or 0) > fit:
            raise ShapeError(f"{owner}: images of {h}x{w} hold {fit} scale(s) of the "
                             f"{self.win_size}-pixel window (each scale halves the image), "
                             f"{self.scales or 1} needed; lower win_size or scales")
        return pred, target

    def forward(self, views: Views, batch: Batch) -> Loss:
        pred, target = self._images(views.embeddings[0], batch.extras[keys.INPUT])
        sim = ms_ssim(pred, target, self.data_range, self.win_size, self.sigma, self.k1, self.k2,
                      self.weights, self.scales)
        per_sample = 1 - sim
        if self.l1_weight:
            l1 = (pred.to(sim.dtype) - target.to(sim.dtype)).abs().flatten(1).mean(1)
            per_sample = (1 - self.l1_weight) * per_sample + self.l1_weight * l1 / self.data_range
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"ms_ssim": sim.detach().mean()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        shape = self.image_shape or (1, 24, 24)
        target = torch.rand(batch_size, *shape, generator=generator)
        noisy = target + 0.1 * torch.randn(batch_size, *shape, generator=generator)
        pred = noisy.flatten(1).requires_grad_()
        return Views(embeddings=(pred,)), Batch(index=torch.arange(batch_size),
                                                extras={keys.INPUT: target})


CARD = Card(
    name="ms_ssim_loss", kind="objective",
    title="Learning to Generate Images with Perceptual Similarity Metrics (MS-SSIM loss)",
    paper="arXiv:1511.06409",
    summary="Train an image generator (autoencoder decoder, super-resolution net) on one minus "
            "the multi-scale structural similarity to the reference image instead of a pixel loss.",
    formula="cs_j = mean (2 s_xy + C2)/(s_x^2 + s_y^2 + C2), l = (2 mu_x mu_y + C1)/(mu_x^2 + "
            "mu_y^2 + C1) at scale j (Gaussian window 11, sigma 1.5, C_i = (K_i L)^2, K = 0.01, "
            "0.03; 2x2 average pooling between scales); MS-SSIM = prod_{j<M} cs_j^{w_j} "
            "(mean l·cs)_M^{w_M}, w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); "
            "L = (1 - a)(1 - MS-SSIM) + a mean|x̂ - x| / L",
    left_out="The paper's autoencoders, human judgements and super-resolution nets are not here. "
             "Deviations: images too small for five scales get as many as fit with the first M "
             "weights renormalised to sum 1 (Wang et al. define five; M = 1 is SSIM); per-scale "
             "terms are clamped at 1e-6 before the power (pytorch_msssim and torchmetrics clamp at "
             "0); colour channels are scored separately and averaged (the index is defined on "
             "grey images); the optional L1 mix (a, default 0) is plain, not the "
             "Gaussian-weighted L1 of Zhao et al.'s MS-SSIM+L1.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MSSSIMLoss, card=CARD)
