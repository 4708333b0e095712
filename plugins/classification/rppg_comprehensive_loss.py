"""TYrPPG's comprehensive loss for remote heart-rate signals: a spectral cross-entropy on the
heart-rate band plus the negative Pearson correlation with the ground-truth signal.

Chen & Cheung, "TYrPPG: Uncomplicated and Enhanced Learning Capability rPPG for Remote Heart
Rate Estimation" (arXiv:2511.05833), as the catalogue reads the authors' repository
(github.com/Taixi-CHEN/TYrPPG): for a z-normalised predicted signal ``s^`` sampled at ``fs``
Hz, the power ``|DFT(hann * s^)|^2`` at the integer heart rates 45..149 bpm, normalised to
sum 1, is fed to a cross-entropy as logits against the ground truth's peak heart rate;
``L = CE + 0.2 (1 - Pearson(s^, s))``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt

from sdk import classification as cls
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

EPS = 1e-12
"""Added under the square roots of the z-normalisation and the Pearson scale (a flat signal
gives finite gradients)."""


def band_power(signal: torch.Tensor, fs: float, low: int = 45, high: int = 149) -> torch.Tensor:
    """``|sum_n hann_n x_n e^{-2 pi i f_k n / fs}|^2`` [B, K] at ``f_k = k / 60`` Hz for the
    integer rates ``k = low..high`` bpm (one [N, K] basis: no FFT grid rounding)."""
    n = signal.shape[-1]
    t = torch.arange(n, device=signal.device, dtype=signal.dtype)
    window = torch.hann_window(n, periodic=False, device=signal.device, dtype=signal.dtype)
    f = torch.arange(low, high + 1, device=signal.device, dtype=signal.dtype) / 60
    phase = 2 * math.pi * t[:, None] * f[None, :] / fs
    x = signal * window
    return (x @ torch.cos(phase)).square() + (x @ torch.sin(phase)).square()


def neg_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - corr(pred, target)`` per row [B]."""
    p = pred - pred.mean(-1, keepdim=True)
    q = target - target.mean(-1, keepdim=True)
    scale = torch.sqrt(p.square().sum(-1) * q.square().sum(-1) + EPS)  # finite gradient at 0
    return 1 - (p * q).sum(-1) / scale


def rppg_loss(pred: torch.Tensor, target: torch.Tensor, fs: float = 30.0, ce_weight: float = 1.0,
              pearson_weight: float = 0.2, low: int = 45, high: int = 149) -> torch.Tensor:
    """Per-sample ``ce_weight CE(ca, argmax P_gt) + pearson_weight (1 - Pearson(s^, s))``,
    ``ca = P(s^) / sum P(s^)``, ``s^`` z-normalised; ``P`` the band power of :func:`band_power`."""
    s = cls.upcast(pred)
    s = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, keepdim=True) + EPS)
    gt = target.to(s.dtype)
    power = band_power(s, fs, low, high)
    ca = power / power.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    with torch.no_grad():
        rate = band_power(gt, fs, low, high).argmax(-1)
    ce = F.cross_entropy(ca, rate, reduction="none")
    return ce_weight * ce + pearson_weight * neg_pearson(s, gt)


class RPPGComprehensiveLoss(Objective):
    """The loss on a predicted pulse signal ``Views.embeddings[0]`` [B, N] (``N`` samples at
    ``fs`` Hz) against the ground-truth signal ``Batch.targets`` [B, N]."""

    requires = {"views": 1, "targets": True}
    consumes = frozenset()
    batch_coupled = False

    def __init__(self, fs: Annotated[float, Gt(0)] = 30.0, ce_weight: Annotated[float, Ge(0)] = 1.0,
                 pearson_weight: Annotated[float, Ge(0)] = 0.2, low_bpm: Annotated[int, Ge(1)] = 45,
                 high_bpm: Annotated[int, Ge(1)] = 149):
        super().__init__()
        if high_bpm <= low_bpm:
            raise ConfigError(f"rppg_comprehensive_loss: high_bpm must exceed low_bpm, got "
                              f"[{low_bpm}, {high_bpm}]", param="high_bpm")
        self.fs, self.ce_weight, self.pearson_weight = fs, ce_weight, pearson_weight
        self.low_bpm, self.high_bpm = low_bpm, high_bpm

    def forward(self, views: Views, batch: Batch) -> Loss:
        pred, gt = views.embeddings[0], batch.targets
        if pred.dim() != 2 or pred.shape[1] < 2 or gt.shape != pred.shape or not gt.is_floating_point():
            raise ShapeError(f"rppg_comprehensive_loss: Batch.targets must be the ground-truth signals "
                             f"matching Views.embeddings[0] {list(pred.shape)} (B signals of N >= 2 "
                             f"samples), got {gt.dtype} {list(gt.shape)}")
        per_sample = rppg_loss(pred, gt, self.fs, self.ce_weight, self.pearson_weight, self.low_bpm,
                               self.high_bpm)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        t = torch.arange(128) / self.fs
        rate = 1 + torch.rand(batch_size, 1, generator=generator)  # 60..120 bpm
        gt = torch.sin(2 * math.pi * rate * t)
        pred = (gt + 0.5 * torch.randn(batch_size, 128, generator=generator)).requires_grad_()
        return Views(embeddings=(pred,)), Batch(targets=gt)


CARD = Card(
    name="rppg_comprehensive_loss", kind="objective",
    title="TYrPPG: Uncomplicated and Enhanced Learning Capability rPPG for Remote Heart Rate Estimation",
    paper="arXiv:2511.05833",
    summary="Remote-PPG signal loss: cross-entropy of the predicted signal's normalised "
            "heart-rate-band power spectrum against the ground truth's peak rate, plus 0.2 "
            "times the negative Pearson correlation with the ground-truth signal.",
    formula="s^ = z-norm(pred); P_k = |sum_n hann_n s^_n exp(-2 pi i (k / 60) n / fs)|^2, "
            "k = 45..149 bpm; ca = P / sum P; HR = argmax_k P_k(gt); "
            "L = 1.0 CE(ca as logits, HR - 45) + 0.2 (1 - Pearson(s^, gt))",
    left_out="Follows the catalogue's reading of the authors' repository (not re-checked here): "
             "the normalised power is fed to the cross-entropy as logits, as there; the repo's "
             "heart-rate MMD term (computed on detached arrays, no gradient) is omitted; the "
             "weakly supervised IPR variant, the Mambaout video model and the PURE/UBFC/MMPD "
             "data are not implemented. The band is evaluated at the integer rates directly "
             "(a DFT basis), not on an FFT grid.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RPPGComprehensiveLoss, card=CARD)
