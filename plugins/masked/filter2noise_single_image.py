"""Filter2Noise (F2N): train an attention-guided bilateral filter on a single noisy image, with a
Noise2Noise-style loss between its two diagonal half-resolution sub-images (each locally
shuffled to break spatially correlated noise) and an edge term.

"Filter2Noise: Interpretable Self-Supervised Single-Image Denoising for Low-Dose CT with
Attention-Guided Bilateral Filtering" (arXiv:2504.13519); the formulas follow the authors' code.

* ``D1, D2``: stride-2 ``2 x 2`` convolutions with ``[[0, 1/2], [1/2, 0]]`` and ``[[1/2, 0], [0,
  1/2]]`` (the two diagonals of each block).
* Euclidean Local Shuffle (ELS): in each ``2 x 2`` block, swap the two pixels closest to each
  other (squared distance over channels; the first pair in row-major order on ties).
* Loss: ``u_k = f(ELS(D_k y))``, ``L = 1/3 |u1 - u2| + 1/3 (|u1 - D1 f(y)| + |u2 - D2 f(y)|) +
  1/3 |D1 f(y) - D2 f(y)| + lambda ||DoG * y| - |DoG * f(y)||`` (means of absolute values), a
  ``7 x 7`` difference of normalised Gaussians ``sigma = 9`` minus ``sigma = 10``, ``lambda = 350``.
* ``f``: stages of the attention-guided bilateral filter (AGBF): per-patch ``sigma_x, sigma_y,
  sigma_r`` from two attention layers over the image's patches, a softplus clamped at 6.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

NAME = "filter2noise_single_image"
SIGMA_MAX = 6.0
"""The clamp of the bounded softplus on every predicted sigma."""
HIDDEN = 8
"""Width of the sigma predictor's attention (the authors')."""


def downsample_pair(y: Tensor) -> tuple[Tensor, Tensor]:
    """``(D1 y, D2 y)`` ``[B, C, H/2, W/2]``: each ``2 x 2`` block's anti-diagonal mean and its
    diagonal mean."""
    c = y.shape[1]
    f1 = y.new_tensor([[0.0, 0.5], [0.5, 0.0]])
    f2 = y.new_tensor([[0.5, 0.0], [0.0, 0.5]])
    kernel = torch.stack([f1, f2]).unsqueeze(1).repeat(c, 1, 1, 1)  # [2C, 1, 2, 2], per channel
    out = F.conv2d(y, kernel, stride=2, groups=c)
    return out[:, 0::2], out[:, 1::2]


def euclidean_local_shuffle(y: Tensor) -> Tensor:
    """ELS: in every ``2 x 2`` block of ``y [B, C, H, W]`` (``H, W`` even) swap the pair of pixels
    with the smallest squared distance over channels (the first such pair in the row-major
    order of the 16 ordered pairs on ties)."""
    b, c, h, w = y.shape
    blocks = y.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, h // 2, w // 2, 4, c)
    d = (blocks.unsqueeze(-2) - blocks.unsqueeze(-3)).pow(2).sum(-1)  # [b, h/2, w/2, 4, 4]
    eye = torch.eye(4, dtype=torch.bool, device=y.device)
    idx = d.masked_fill(eye, float("inf")).flatten(-2).argmin(-1)
    p, q = idx // 4, idx % 4
    perm = torch.arange(4, device=y.device).expand(*idx.shape, 4)
    p, q = p.unsqueeze(-1), q.unsqueeze(-1)
    perm = torch.where(perm == p, q, torch.where(perm == q, p, perm))  # the block's positions, p <-> q
    shuffled = blocks.gather(-2, perm.unsqueeze(-1).expand(*perm.shape, c))
    return shuffled.reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def dog_kernel(size: int = 7, sigma_narrow: float = 9.0, sigma_wide: float = 10.0) -> Tensor:
    """``[size, size]``: the difference of two normalised isotropic Gaussians."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    d2 = r.view(-1, 1) ** 2 + r.view(1, -1) ** 2
    g1, g2 = torch.exp(-d2 / (2 * sigma_narrow ** 2)), torch.exp(-d2 / (2 * sigma_wide ** 2))
    return g1 / g1.sum() - g2 / g2.sum()


def f2n_loss(denoise, y: Tensor, dog: Tensor, lam: float = 350.0) -> tuple[Tensor, dict[str, Tensor]]:
    """``(per_sample [B], terms)``: the Filter2Noise loss of the denoiser ``denoise`` on the noisy
    images ``y [B, C, H, W]`` with the edge kernel ``dog [k, k]`` (means over each image)."""
    def l1(a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().flatten(1).mean(1)

    y1, y2 = downsample_pair(y)
    u1, u2 = denoise(euclidean_local_shuffle(y1)), denoise(euclidean_local_shuffle(y2))
    full = denoise(y)
    a, b = downsample_pair(full)
    c, k = y.shape[1], dog.shape[-1]
    kernel = dog.to(y).expand(c, 1, k, k)
    edges_y = F.conv2d(y, kernel, padding=k // 2, groups=c).abs()
    edges_f = F.conv2d(full, kernel, padding=k // 2, groups=c).abs()
    terms = {"resolution": l1(u1, u2) / 3, "cross_scale": (l1(u1, a) + l1(u2, b)) / 3,
             "denoise": l1(a, b) / 3, "edge": lam * l1(edges_y, edges_f)}
    return sum(terms.values()), terms


class SigmaPredictor(nn.Module):
    """``[B, C, H, W] -> [B, H, W, 3]``: ``(sigma_x, sigma_y, sigma_r)`` per ``p x p`` patch
    (repeated over its pixels) from two single-head attention layers over the flattened
    patches, a LayerNorm, a linear map and ``min(softplus, 6) + 1e-6``."""

    def __init__(self, channels: int, patch: int):
        super().__init__()
        self.patch = patch
        d = channels * patch * patch
        self.q, self.k, self.v = nn.Linear(d, HIDDEN), nn.Linear(d, HIDDEN), nn.Linear(d, HIDDEN)
        self.q2, self.k2, self.v2 = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.norm, self.proj = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, 3)

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(HIDDEN), dim=-1) @ v

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        feats = self._attend(self.q(patches), self.k(patches), self.v(patches))
        s = self.proj(self.norm(self._attend(self.q2(feats), self.k2(feats), self.v2(feats))))
        s = F.softplus(s).clamp(max=SIGMA_MAX) + 1e-6
        s = s.view(b, h // p, w // p, 3)
        return s.repeat_interleave(p, 1).repeat_interleave(p, 2)


def bilateral_filter(x: Tensor, sigmas: Tensor, radius: int) -> Tensor:
    """Per-pixel bilateral filter of ``x [B, C, H, W]`` (reflect padding) over a ``(2r+1)^2``
    window: weights ``exp(-dx^2 / (2 sx^2) - dy^2 / (2 sy^2)) exp(-||x_q - x_p||^2 / (2 sr^2))``
    (range distance summed over channels), normalised (``+ 1e-8``); ``sigmas [B, H, W, 3]``."""
    b, c, h, w = x.shape
    k = 2 * radius + 1
    neigh = F.unfold(F.pad(x, (radius,) * 4, mode="reflect"), k).view(b, c, k * k, h, w)
    r = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    dy, dx = (r.view(-1, 1).expand(k, k).reshape(-1, 1, 1), r.view(1, -1).expand(k, k).reshape(-1, 1, 1))
    sx, sy, sr = (sigmas[..., i].unsqueeze(1) for i in range(3))  # [B, 1, H, W]
    spatial = torch.exp(-dx ** 2 / (2 * sx ** 2) - dy ** 2 / (2 * sy ** 2))  # [B, k*k, H, W]
    rng = torch.exp(-(neigh - x.unsqueeze(2)).pow(2).sum(1) / (2 * sr ** 2))
    weight = spatial * rng
    weight = weight / (weight.sum(1, keepdim=True) + 1e-8)
    return (neigh * weight.unsqueeze(1)).sum(2)


class AGBF(nn.Module):
    """``stages`` attention-guided bilateral filters in sequence; the window's radius is
    ``ceil(6) = 6``, the largest sigma the predictor can give."""

    def __init__(self, channels: int = 1, patch: int = 8, stages: int = 2):
        super().__init__()
        self.predictors = nn.ModuleList(SigmaPredictor(channels, patch) for _ in range(stages))
        self.radius = math.ceil(SIGMA_MAX)

    def forward(self, x: Tensor, return_sigmas: bool = False):
        sigmas = []
        for predictor in self.predictors:
            s = predictor(x)
            x = bilateral_filter(x, s, self.radius)
            sigmas.append(s)
        return (x, sigmas) if return_sigmas else x


class Filter2Noise(Objective):
    """The noisy image ``Views.embeddings[0]`` ``[B, C*H*W]`` of ``image_shape`` (from any
    encoder that passes pixels on: the identity or a fixed preprocessing) is denoised by this
    objective's AGBF pipeline (``stages`` filters, sigma patches of ``patch_size``) inside the
    F2N loss (:func:`f2n_loss`); :meth:`denoise` applies the trained filter. ``H/2`` and ``W/2``
    must be multiples of ``patch_size`` and at least 7 (the window's reflect padding)."""

    requires = {"views": 1}
    batch_coupled = False

    def __init__(self, image_shape: tuple[Annotated[int, Ge(1)], ...] | list[int] = (1, 16, 16),
                 patch_size: Annotated[int, Ge(1)] = 8, stages: Annotated[int, Ge(1)] = 2,
                 lam: Annotated[float, Ge(0)] = 350.0, dog_size: Annotated[int, Ge(1)] = 7,
                 sigma_narrow: Annotated[float, Gt(0)] = 9.0, sigma_wide: Annotated[float, Gt(0)] = 10.0):
        super().__init__()
        shape = tuple(int(s) for s in image_shape)
        step = 2 * patch_size
        if len(shape) != 3 or shape[1] % step or shape[2] % step or min(shape[1:]) < 14:
            raise ConfigError(f"{NAME}: image_shape must be (C, H, W) with H and W multiples of "
                              f"2 * patch_size = {2 * patch_size} and at least 14, got {list(shape)}",
                              param="image_shape")
        if dog_size % 2 == 0:
            raise ConfigError(f"{NAME}: dog_size must be odd, got {dog_size}", param="dog_size")
        self.image_shape, self.lam = shape, lam
        self.denoiser = AGBF(shape[0], patch_size, stages)
        self.register_buffer("dog", dog_kernel(dog_size, sigma_narrow, sigma_wide).float(), persistent=False)

    def denoise(self, y: Tensor) -> Tensor:
        """The trained filter on images ``[B, C, H, W]``."""
        return self.denoiser(y)

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.embeddings[0]
        if z.shape[1] != math.prod(self.image_shape):
            raise ShapeError(f"objective {NAME!r}: Views.embeddings[0] must hold the noisy images "
                             f"[B, {math.prod(self.image_shape)}] of image_shape "
                             f"{list(self.image_shape)}, got {list(z.shape)}")
        y = z.to(self.denoiser.predictors[0].proj.weight.dtype).reshape(-1, *self.image_shape)
        per_sample, terms = f2n_loss(self.denoiser, y, self.dog, self.lam)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={k: v.mean().detach() for k, v in terms.items()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        y = torch.rand(batch_size, math.prod(self.image_shape), generator=generator)
        return Views(embeddings=(y.requires_grad_(),)), Batch(index=torch.arange(batch_size))


CARD = Card(
    name=NAME, kind="objective",
    title="Filter2Noise: Interpretable Self-Supervised Single-Image Denoising for Low-Dose CT with "
          "Attention-Guided Bilateral Filtering (F2N)",
    paper="arXiv:2504.13519",
    summary="Single-image self-supervised denoising: an attention-guided bilateral filter (per-patch "
            "sigma_x, sigma_y, sigma_r) trained on a Noise2Noise-style loss between the image's two "
            "diagonal half-resolution sub-images, each locally shuffled (ELS), plus a DoG edge term.",
    formula="D1, D2: stride-2 2x2 [[0,.5],[.5,0]], [[.5,0],[0,.5]]; ELS: swap the closest pair of "
            "each 2x2 block; u_k = f(ELS(D_k y)); L = 1/3 |u1 - u2| + 1/3 (|u1 - D1 f(y)| + "
            "|u2 - D2 f(y)|) + 1/3 |D1 f(y) - D2 f(y)| + 350 ||DoG*y| - |DoG*f(y)||, DoG 7x7 "
            "N(9) - N(10); f = AGBF^2, sigmas = min(softplus(attn(patches)), 6) + 1e-6",
    left_out="Low-dose CT data (Mayo 2016), the Mamba/xLSTM/4-D variants and interactive per-region "
             "sigma editing are not here. The bilateral window is fixed at 13 x 13 (radius ceil(6), "
             "the largest sigma the clamp allows) instead of sized from the batch's largest sigma "
             "(a host read per step); larger windows only add weights below exp(-18). The denoiser "
             "is the objective's own (as a decoder is); the authors' AdamW (lr 1e-3) with one-cycle "
             "schedule over 500 steps on one image is the user's training loop.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Filter2Noise, card=CARD)
