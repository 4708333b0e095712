"""Batch Styles Standardization (BSS): one Fourier amplitude (style) for every image of a batch.

Scalbert, Vakalopoulou and Couzinié-Devy, "Towards domain-invariant Self-Supervised Learning
with Batch Styles Standardization", ICLR 2024.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Interval, Len
from torch import Tensor

from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Transform
from sdk.types import Batch

STYLES = ("random", "mean")


def low_frequency_window(h: int, w: int, area_ratio: float | Tensor, device=None) -> Tensor:
    """Boolean ``[H, W]`` mask (unshifted FFT layout) of the centred low-frequency square whose
    area is ``area_ratio`` of the spectrum: ``|f_y| <= sqrt(r)/2 and |f_x| <= sqrt(r)/2`` in
    cycles per sample. Symmetric under f -> -f, so a real image stays real."""
    half = torch.as_tensor(area_ratio, dtype=torch.float32, device=device).sqrt() / 2
    fy = torch.fft.fftfreq(h, device=device).abs()
    fx = torch.fft.fftfreq(w, device=device).abs()
    return (fy[:, None] <= half) & (fx[None, :] <= half)


def batch_style_standardization(x: Tensor, *, area_ratio: float | Tensor = 1.0, mix: float = 1.0,
                                reference: int | Tensor | None = None) -> Tensor:
    """Give every image of ``x`` [B, ..., H, W] the batch's style inside the low-frequency window::

        A_i = |F(x_i)|, phi_i = arg F(x_i)
        A_ref = A_reference (a chosen image) or mean_i A_i (reference=None)
        A'_i = A_i + window * mix * (A_ref - A_i)
        x'_i = Re F^-1(A'_i exp(j phi_i))

    (2-D FFT over the last two dimensions, per channel). ``mix=1, area_ratio=1``: all samples
    share one amplitude spectrum; ``mix=0``: identity.
    """
    if x.dim() < 3:
        raise ShapeError(f"batch_style_standardization: expected x of shape [B, ..., H, W], got "
                         f"{list(x.shape)}")
    spectrum = torch.fft.fft2(x.to(torch.promote_types(x.dtype, torch.float32)))
    amp, phase = spectrum.abs(), spectrum.angle()
    ref = amp.mean(dim=0, keepdim=True) if reference is None else amp[reference].unsqueeze(0)
    window = low_frequency_window(x.shape[-2], x.shape[-1], area_ratio, device=x.device)
    new_amp = amp + window * mix * (ref - amp)
    return torch.fft.ifft2(torch.polar(new_amp, phase)).real.to(x.dtype)


class BatchStyleStandardization(Transform):
    """Per call (one per view), draws ``r ~ U(r_min, r_max)`` and, with ``style="random"``, one
    image of the batch whose amplitude spectrum becomes everyone's (``"mean"``: the batch mean
    amplitude); see :func:`batch_style_standardization`. Flat inputs [B, prod(image_shape)] are
    reshaped to ``image_shape`` ((H, W) or (C, H, W)) and back. ``extras`` record
    ``bss_area_ratio`` and (random style) ``bss_reference``. Acts in training mode only."""

    def __init__(self, image_shape: Annotated[tuple[Annotated[int, Ge(1)], ...]
                                              | list[Annotated[int, Ge(1)]], Len(2, 3)] | None = None,
                 r_min: Annotated[float, Interval(gt=0, le=1)] = 1.0,
                 r_max: Annotated[float, Interval(gt=0, le=1)] = 1.0,
                 mix: Annotated[float, Interval(ge=0, le=1)] = 1.0,
                 style: Annotated[str, one_of(STYLES)] = "random"):
        super().__init__()
        if not r_min <= r_max:
            raise ConfigError(f"batch_style_standardization: need r_min <= r_max, got "
                              f"r_min={r_min}, r_max={r_max}", param="r_max")
        self.image_shape = None if image_shape is None else tuple(image_shape)
        self.r_min, self.r_max, self.mix, self.style = r_min, r_max, mix, style

    def _images(self, x: Tensor) -> Tensor:
        if self.image_shape is None:
            if x.dim() < 3:
                raise ShapeError(f"transform 'batch_style_standardization': input {list(x.shape)} is "
                                 "not [B, H, W] or [B, C, H, W]; give image_shape= to reshape flat "
                                 "features")
            return x
        n = math.prod(self.image_shape)
        if x.dim() != 2 or x.shape[1] != n:
            raise ShapeError(f"transform 'batch_style_standardization': image_shape={self.image_shape} "
                             f"needs flat inputs [B, {n}], got {list(x.shape)}")
        return x.reshape(x.shape[0], *self.image_shape)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        if not self.training:
            return x, batch
        images = self._images(x)
        r = self.r_min + (self.r_max - self.r_min) * torch.rand((), device=x.device)
        extras = {**batch.extras, "bss_area_ratio": r}
        reference = None
        if self.style == "random":
            reference = torch.randint(x.shape[0], (), device=x.device)
            extras["bss_reference"] = reference
        out = batch_style_standardization(images, area_ratio=r, mix=self.mix, reference=reference)
        return out.reshape(x.shape), batch.evolve(extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        shape = self.image_shape or (1, 8, 8)
        x = torch.rand(batch_size, math.prod(shape), generator=generator)
        return (x if self.image_shape else x.reshape(batch_size, *shape)), Batch()


CARD = Card(
    name="batch_style_standardization", kind="transform",
    title="Towards domain-invariant Self-Supervised Learning with Batch Styles Standardization",
    paper="arXiv:2303.06088",
    summary="Fourier style standardisation: every image of a view's batch gets the low-frequency "
            "amplitude spectrum of one randomly chosen batch image (or of the batch mean), "
            "keeping its own phase, so style cannot separate positives from negatives.",
    formula="A_i = |F(x_i)|, phi_i = arg F(x_i); A_ref = A_k (k ~ U{1..B}) or mean_i A_i; "
            "M = [|f_y| <= sqrt(r)/2 and |f_x| <= sqrt(r)/2], r ~ U(r_min, r_max); "
            "x'_i = Re F^-1((A_i + mix M (A_ref - A_i)) exp(j phi_i)); defaults r = 1, mix = 1",
    left_out="The paper samples the area ratio r in (r_min, r_max); its default values were not "
             "checked here, so the defaults (r = 1: the whole amplitude spectrum) are this "
             "implementation's choice. The paper's companion augmentations (batch-wise colour "
             "jitter, independent Fourier amplitude mixing) and the SSL methods it is combined with "
             "(SimCLR, SWaV, MSN) are separate plugins or not implemented; mix < 1 and the batch-mean "
             "style are extensions.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BatchStyleStandardization, card=CARD)
