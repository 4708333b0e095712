"""AdvEncoder's downstream-agnostic universal adversarial perturbation: one perturbation, within an
L-infinity ball, that moves a frozen pre-trained encoder's embeddings of every input away from
their clean embeddings (whatever downstream head follows) while changing the images' high
frequencies, where the encoder's texture cues live.

Zhou, Hu, Li, Zhang, Zhang & Jin, "Downstream-agnostic Adversarial Examples", ICCV 2023
(arXiv:2308.12661); checked against the authors' code (github AdvEncoder, ``gan_per_attack.py``:
``alpha * L_adv + MSE(x + delta, x) - MSE(HF(x + delta), HF(x))``, ``L_adv = -InfoNCE(f(x),
f(x + delta))`` at temperature 0.1, ``alpha = 5``, ``eps = 10/255``, the high-pass a centred disc of
radius 8 removed from the shifted 2-D spectrum).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.adversarial import _EvalMode
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Transform
from sdk.state import ResizableBuffers
from sdk.types import Batch


def high_frequency(x: Tensor, radius: float) -> Tensor:
    """``x`` ``[B, C, H, W]`` without its low frequencies: the 2-D spectrum, centred
    (``fftshift``), zeroed where the distance to ``(H / 2, W / 2)`` is below ``radius``, back to
    the image domain (real part)."""
    h, w = x.shape[-2:]
    i = torch.arange(h, device=x.device, dtype=torch.float64)[:, None]
    j = torch.arange(w, device=x.device, dtype=torch.float64)[None, :]
    keep = (((i - h / 2) ** 2 + (j - w / 2) ** 2).sqrt() >= radius).to(x.dtype)
    spectrum = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1)) * keep
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real


def advencoder_loss(clean: Tensor, perturbed: Tensor, x: Tensor, x_adv: Tensor, *, alpha: float = 5.0,
                    radius: float = 8.0, temperature: float = 0.1, criterion: str = "nce") -> Tensor:
    """``alpha L_adv + mean (x_adv - x)^2 - mean (HF(x_adv) - HF(x))^2``; ``L_adv`` is
    ``-InfoNCE`` (``criterion="nce"``: cross-entropy of ``cos(f(x_i), f(x_adv)_j) / t`` with the
    diagonal as the positives, negated so that minimising pushes the pairs apart) or the mean
    cosine of each clean and perturbed embedding (``"cos"``)."""
    if criterion == "cos":
        adv = F.cosine_similarity(clean.float(), perturbed.float(), dim=1).mean()
    else:
        logits = F.normalize(clean.float(), dim=1) @ F.normalize(perturbed.float(), dim=1).T
        adv = -F.cross_entropy(logits / temperature, torch.arange(len(clean), device=clean.device))
    hf = F.mse_loss(high_frequency(x_adv.float(), radius), high_frequency(x.float(), radius))
    return alpha * adv + F.mse_loss(x_adv.float(), x.float()) - hf


class AdvEncoderUAP(ResizableBuffers, Transform):
    """Adds the universal perturbation ``delta`` (a buffer ``[C, H, W]``, so checkpoints carry it)
    to every image ``[B, C, H, W]``, clipped to ``clip``. :meth:`fit` learns ``delta`` against a
    frozen encoder by Adam on :func:`advencoder_loss`, projecting onto ``||delta||_inf <= eps``
    after every step; the encoder's parameters and modes are untouched (it runs in eval mode)."""

    resizable_buffers = ("delta",)

    def __init__(self, eps: Annotated[float, Gt(0)] = 10 / 255, alpha: Annotated[float, Ge(0)] = 5.0,
                 radius: Annotated[float, Ge(0)] = 8.0, temperature: Annotated[float, Gt(0)] = 0.1,
                 criterion: Annotated[str, one_of(("nce", "cos"))] = "nce",
                 clip: tuple[float, float] | None = (0.0, 1.0)):
        super().__init__()
        self.eps, self.alpha, self.radius, self.temperature = eps, alpha, radius, temperature
        self.criterion, self.clip = criterion, clip
        self.register_buffer("delta", torch.zeros(0))

    def _check(self, x: Tensor, where: str) -> None:
        if x.dim() != 4 or not x.is_floating_point():
            raise ShapeError(f"transform 'adv_encoder_uap': {where} must be floating images "
                             f"[B, C, H, W], got {x.dtype} {list(x.shape)}")
        if self.delta.numel() and x.shape[1:] != self.delta.shape:
            raise ShapeError(f"transform 'adv_encoder_uap': {where} {list(x.shape)} do not match the "
                             f"perturbation {list(self.delta.shape)}")

    def perturb(self, x: Tensor, delta: Tensor) -> Tensor:
        out = x + delta.to(x.dtype)
        return out.clamp(*self.clip) if self.clip is not None else out

    def fit(self, encoder: nn.Module, images: Tensor, *, steps: int = 200, lr: float = 0.01,
            batch_size: int = 256, seed: int = 0) -> AdvEncoderUAP:
        """Learn ``delta`` on the surrogate ``images`` ``[N, C, H, W]`` (shuffled batches)."""
        self._check(images, "the surrogate images")
        g = torch.Generator().manual_seed(seed)
        delta = torch.zeros(images.shape[1:], device=images.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        params = [p for p in encoder.parameters()]
        frozen = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with _EvalMode(encoder), torch.enable_grad():
                for _ in range(steps):
                    idx = torch.randperm(len(images), generator=g)[:batch_size].to(images.device)
                    x = images[idx]
                    x_adv = self.perturb(x, delta)
                    with torch.no_grad():
                        clean = encoder(x)
                    loss = advencoder_loss(clean, encoder(x_adv), x, x_adv, alpha=self.alpha,
                                           radius=self.radius, temperature=self.temperature,
                                           criterion=self.criterion)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        delta.clamp_(-self.eps, self.eps)
        finally:
            for p, flag in zip(params, frozen):
                p.requires_grad_(flag)
        self.delta = delta.detach().clone()
        return self

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        if not self.delta.numel():
            raise NotFittedError("transform 'adv_encoder_uap' has no perturbation: call fit(encoder, "
                                 "images) first")
        self._check(x, "the inputs")
        return self.perturb(x, self.delta.to(x.device)), batch

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: images of the perturbation's shape (a fitted one of 1 x 8 x 8
        from a small seeded encoder when none was fitted)."""
        if not self.delta.numel():
            encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
            with torch.no_grad():
                for p in encoder.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
            self.fit(encoder, torch.rand(32, 1, 8, 8, generator=g), steps=3, batch_size=16)
        return torch.rand(batch_size, *self.delta.shape, generator=g), Batch()


CARD = Card(
    name="adv_encoder_uap", kind="transform",
    title="Downstream-agnostic Adversarial Examples",
    paper="arXiv:2308.12661",
    summary="AdvEncoder's universal perturbation against a frozen pre-trained encoder: pushes each "
            "image's embedding away from its clean embedding (negated InfoNCE) and changes its high "
            "frequencies, within an L-inf ball; applied to every input as a transform.",
    formula="min_delta alpha (-InfoNCE_t(f(x), f(x + delta))) + ||x + delta - x||^2 / n - "
            "||HF(x + delta) - HF(x)||^2 / n, ||delta||_inf <= eps; HF = ifft(ifftshift(mask_r "
            "fftshift(fft2(x)))), mask_r = 0 inside radius r of the centre; alpha = 5, t = 0.1, "
            "eps = 10/255, r = 8",
    left_out="The generative network (a DCGAN generator from fixed noise) that the authors train to "
             "output the perturbation: delta is optimised directly (Adam, projection to the ball). "
             "The metric part (downstream accuracy drop and fooling rate) is not a plugin here; "
             "the test measures it with a linear probe. Adversarial patches, the victim encoders "
             "(SimCLR, BYOL, ... on ImageNet) and the defences are not included. The radius 8 "
             "suits 32 x 32 images; scale it to the image size.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AdvEncoderUAP, card=CARD)
