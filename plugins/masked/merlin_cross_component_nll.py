"""MERLIN: train a despeckling network on single-look complex SAR data by predicting the
reflectivity from one component (real or imaginary part) and scoring it by the Gaussian
likelihood of the other.

Dalsasso, Denis and Tupin, "As if by magic: self-supervised training of deep despeckling
networks with MERLIN", IEEE TGRS 60, 2022 (arXiv:2110.13148). Under fully developed speckle
the real and imaginary parts ``a, b`` of a pixel of reflectivity ``R`` are independent
``N(0, R / 2)``, so the network that sees ``a`` cannot copy the noise of ``b``: the negative
log-likelihood of ``b`` under ``N(0, R_hat / 2)``, ``1/2 log R_hat + b^2 / R_hat`` (constants
dropped), is minimised in expectation by ``R_hat = 2 E[b^2 | a] = R``.

As in the authors' code, the network works on normalised log-amplitudes: its input is
``(log(a^2 + 1e-3) - 2 m) / (2 (M - m))`` and its output ``u`` means
``log R_hat = 2 (u (M - m) + m)``; ``m, M`` default to the authors' TerraSAR-X constants.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.types import Batch, Loss, Views

NAME = "merlin_cross_component_nll"
LOG_M, LOG_MAX = -1.429329123112601, 10.089038980848645
"""The authors' normalisation range ``(m, M)`` of log-amplitudes (TerraSAR-X images)."""
INPUT_EPS = 1e-3
"""``log(a^2 + 1e-3)``: the authors' floor inside the input's logarithm."""
R_EPS = 1e-6
"""``R_hat = exp(log R_hat) + 1e-6``: the authors' floor under the estimated reflectivity."""


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normalize_component(a: Tensor, m: float = LOG_M, big_m: float = LOG_MAX) -> Tensor:
    """The network's input ``(log(a^2 + 1e-3) - 2 m) / (2 (M - m))`` of one component ``a``."""
    return (torch.log(a.square() + INPUT_EPS) - 2 * m) / (2 * (big_m - m))


def log_reflectivity(u: Tensor, m: float = LOG_M, big_m: float = LOG_MAX) -> Tensor:
    """``log R_hat = 2 (u (M - m) + m)`` of the network's normalised output ``u``."""
    return 2 * (u * (big_m - m) + m)


def merlin_nll(u: Tensor, b: Tensor, m: float = LOG_M, big_m: float = LOG_MAX) -> Tensor:
    """``[B]``: the mean over each sample's pixels of ``1/2 s + b^2 / (exp(s) + 1e-6)``, ``s =
    log R_hat`` (:func:`log_reflectivity` of the output ``u``), ``b`` the component the network
    did not see (rows of ``u`` and ``b`` hold the same number of pixels). The division is
    ``b^2 exp(-logaddexp(s, log 1e-6))``, which stays finite where ``exp(s)`` overflows."""
    s = log_reflectivity(_wide(u).flatten(1), m, big_m)
    inv_r = torch.exp(-torch.logaddexp(s, torch.full_like(s, math.log(R_EPS))))
    return (0.5 * s + _wide(b).flatten(1).square() * inv_r).mean(1)


def merlin_estimate(u_real: Tensor, u_imag: Tensor, m: float = LOG_M,
                    big_m: float = LOG_MAX) -> Tensor:
    """The despeckled reflectivity at test time: the mean ``(R_hat(a) + R_hat(b)) / 2`` of the
    network's estimates from the real part and from the imaginary part."""
    return 0.5 * (log_reflectivity(u_real, m, big_m).exp() + log_reflectivity(u_imag, m, big_m).exp())


def _check_range(m: float, big_m: float) -> None:
    if not big_m > m:
        raise ConfigError(f"{NAME}: log_max must exceed log_min (the normalisation range of "
                          f"log-amplitudes), got log_min={m}, log_max={big_m}", param="log_max")


class MerlinSplit(Transform):
    """``x [B, 2, ...]`` (channel 0: the real part ``a``, channel 1: the imaginary part ``b`` of a
    single-look complex image) ``-> (normalize_component(seen) [B, 1, ...], batch +
    {keys.OTHER_COMPONENT: other [B, 1, ...]})``. With ``swap`` each sample sees ``a`` or ``b``
    with probability 1/2 (the other is its target); without, every sample sees ``a``."""

    def __init__(self, log_min: float = LOG_M, log_max: float = LOG_MAX, swap: bool = True):
        super().__init__()
        _check_range(log_min, log_max)
        self.log_min, self.log_max, self.swap = log_min, log_max, swap

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        if not x.is_floating_point() or x.dim() < 2 or x.shape[1] != 2:
            raise ShapeError(f"transform {NAME!r}: x must be the floating real and imaginary parts "
                             f"[B, 2, ...] of complex images, got {x.dtype} {list(x.shape)}")
        a, b = x[:, :1], x[:, 1:]
        if self.swap:
            flip = (torch.rand(x.shape[0], device=x.device) < 0.5).view(-1, *[1] * (x.dim() - 1))
            a, b = torch.where(flip, b, a), torch.where(flip, a, b)
        seen = normalize_component(a, self.log_min, self.log_max)
        return seen, batch.evolve(extras={**batch.extras, keys.OTHER_COMPONENT: b})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        r = 0.05 + torch.rand(batch_size, 1, 4, 4, generator=generator)
        z = torch.randn(batch_size, 2, 4, 4, generator=generator) * (r / 2).sqrt()
        return z, Batch(index=torch.arange(batch_size))


class MerlinNLL(Objective):
    """The network's normalised log-amplitude output ``Views.embeddings[0]`` ``[B, N]`` (``N``
    pixels, fed :class:`MerlinSplit`'s input) against ``Batch.extras[keys.OTHER_COMPONENT]``
    (``[B, ...]`` of ``N`` values): ``L = mean_i mean_p 1/2 log R_hat_ip + b_ip^2 / R_hat_ip``,
    the Gaussian NLL of the unseen component under variance ``R_hat / 2``."""

    requires = {"views": 1, "extras": (keys.OTHER_COMPONENT,)}
    batch_coupled = False

    def __init__(self, log_min: float = LOG_M, log_max: float = LOG_MAX):
        super().__init__()
        _check_range(log_min, log_max)
        self.log_min, self.log_max = log_min, log_max

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {NAME!r}"
        u, b = views.embeddings[0], batch.extras[keys.OTHER_COMPONENT]
        if (not isinstance(b, Tensor) or not b.is_floating_point() or b.dim() < 2
                or b.shape[0] != u.shape[0] or b[0].numel() != u.shape[1]):
            shape = f"{b.dtype} {list(b.shape)}" if isinstance(b, Tensor) else type(b).__name__
            raise ShapeError(f"{owner}: Batch.extras[{keys.OTHER_COMPONENT!r}] must be the floating "
                             f"unseen component of {u.shape[0]} rows of {u.shape[1]} pixels (the "
                             f"width of Views.embeddings[0]), got {shape}")
        per_sample = merlin_nll(u, b, self.log_min, self.log_max)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        u = torch.rand(batch_size, 16, generator=generator).requires_grad_()
        b = torch.randn(batch_size, 1, 4, 4, generator=generator)
        return Views(embeddings=(u,)), Batch(index=torch.arange(batch_size),
                                             extras={keys.OTHER_COMPONENT: b})


_TITLE = "As if by magic: self-supervised training of deep despeckling networks with MERLIN"
_PAPER = "arXiv:2110.13148"
_NORMALISATION = ("u_in = (log(a^2 + 1e-3) - 2 m) / (2 (M - m)); log R_hat = 2 (u (M - m) + m), "
                  "m = -1.4293, M = 10.0890")

TRANSFORM_CARD = Card(
    name=NAME, kind="transform", title=_TITLE, paper=_PAPER,
    summary="Split single-look complex images into their real and imaginary parts: the network "
            "sees the normalised log-intensity of one, the loss is scored on the other.",
    formula=f"z = a + i b; per sample (swap) seen, other = (a, b) or (b, a), p = 1/2; {_NORMALISATION}",
    left_out="The paper alternates the roles of a and b between steps; here each sample draws "
             "them (same expectation, both roles in every batch). Sensor-specific handling of "
             "spatially correlated speckle (spectrum whitening and subsampling of the SLC) is not "
             "implemented: the components must be spatially decorrelated already.",
)

OBJECTIVE_CARD = Card(
    name=NAME, kind="objective", title=_TITLE, paper=_PAPER,
    summary="Gaussian negative log-likelihood of the unseen component of a complex SAR pixel "
            "under the variance R_hat / 2 predicted from the seen one; minimised by R_hat = R.",
    formula=f"{_NORMALISATION}; R_hat = exp(log R_hat) + 1e-6; "
            "L = mean_i mean_p 1/2 log R_hat_ip + b_ip^2 / R_hat_ip; "
            "test: R_hat = (R_hat(a) + R_hat(b)) / 2 (merlin_estimate)",
    left_out="The U-Net despeckler is the user's encoder (its flat [B, H*W] output here); real SLC "
             "archives (TerraSAR-X, Sentinel-1) are not shipped. The authors' extra division of "
             "the mean by the batch size (a learning-rate scale) is left out. m and M default to "
             "the authors' TerraSAR-X range; other data needs its own.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MerlinSplit, card=TRANSFORM_CARD)
    registry.add(MerlinNLL, card=OBJECTIVE_CARD)
