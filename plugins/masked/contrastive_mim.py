"""Contrastive MIM (cMIM): the asymmetric Mutual Information Machine's loss of a Gaussian
encoder-decoder, plus an augmentation-free contrastive term in which each sample's latent code
must be likelier under its own encoding distribution than under the other samples'.

Livne, "cMIM: A Contrastive Mutual Information Framework for Unified Generative and
Discriminative Representation Learning", 2025 (arXiv:2502.19642); A-MIM is Livne, Swersky and
Fleet, "MIM: Mutual Information Machine", 2019 (arXiv:1910.03175).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather, world_size
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.layers import mlp_layers
from sdk.types import Batch, Loss, Views

_LOG_2PI = math.log(2 * math.pi)
LOG_STD_BOUND = 7.0
"""The posterior's log standard deviation is ``7 tanh(a / 7)`` of the head's output ``a``: within
``(-7, 7)``, so exp and its square stay finite for any encoder output."""


def gaussian_log_density(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``[B]``: ``sum_d log N(z_d; mean_d, exp(log_std_d)^2)`` row by row."""
    return -(0.5 * _LOG_2PI + log_std + 0.5 * ((z - mean) * torch.exp(-log_std)).pow(2)).sum(-1)


def cross_log_density(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """``[A, N]``: ``log q(z_a | x_n) = sum_d log N(z_ad; mean_nd, exp(log_std_nd)^2)`` for every
    code ``z [A, D]`` under every encoding distribution ``(mean, log_std) [N, D]``, by matrix
    products (no ``[A, N, D]`` tensor)."""
    prec = torch.exp(-2 * log_std)  # [N, D]
    quad = z.pow(2) @ prec.T - 2 * z @ (mean * prec).T + (mean.pow(2) * prec).sum(1)[None]
    return -(0.5 * _LOG_2PI * z.shape[1] + log_std.sum(1))[None] - 0.5 * quad


def cmim_loss(x: Tensor, x_hat: Tensor, z: Tensor, mean: Tensor, log_std: Tensor, *,
              decoder_std: float = 1.0, contrastive_weight: float = 1.0,
              candidates: tuple[Tensor, Tensor] | None = None, offset: int = 0
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``(per_sample, mim, contrastive)``, each ``[B]``, for inputs ``x [B, P]``, their
    reconstructions ``x_hat = dec(z) [B, P]``, codes ``z [B, D]`` drawn from ``q(z|x) =
    N(mean, exp(log_std)^2)``:

    ``mim_i = -1/2 (log p(x_i|z_i) + log p(z_i) + log q(z_i|x_i))`` (A-MIM) with
    ``p(x|z) = N(x_hat, decoder_std^2 I)`` and ``p(z) = N(0, I)``;
    ``contrastive_i = -log(q(z_i|x_i) / sum_j q(z_i|x_j))`` over the encoding distributions
    ``candidates`` (``(mean, log_std)`` of every sample, this batch's at rows ``offset ...
    offset + B``; default this batch's); ``per_sample = mim + contrastive_weight * contrastive``.
    In float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(mean.dtype, torch.float32)
    x, x_hat, z, mean, log_std = (t.to(dtype) for t in (x, x_hat, z, mean, log_std))
    log_sx = math.log(decoder_std)
    log_px = -(0.5 * _LOG_2PI + log_sx + 0.5 * ((x - x_hat) / decoder_std).pow(2)).sum(1)
    log_pz = -(0.5 * _LOG_2PI + 0.5 * z.pow(2)).sum(1)
    log_qz = gaussian_log_density(z, mean, log_std)
    mim = -0.5 * (log_px + log_pz + log_qz)
    c_mean, c_log_std = (mean, log_std) if candidates is None else (t.to(dtype) for t in candidates)
    logits = cross_log_density(z, c_mean, c_log_std)  # [B, N]
    own = torch.arange(z.shape[0], device=z.device) + offset
    contrastive = torch.logsumexp(logits, 1) - logits.gather(1, own[:, None])[:, 0]
    return mim + contrastive_weight * contrastive, mim, contrastive


class ContrastiveMIM(Objective):
    """The encoder's output ``h = Views.embeddings[0]`` ``[B, embed_dim]`` parameterises this
    objective's Gaussian posterior ``q(z|x) = N(W_mu h, exp(s)^2)``, ``s = 7 tanh(W_s h / 7)``
    (:data:`LOG_STD_BOUND`), of ``latent_dim``
    dimensions; in training ``z = mean + exp(log_std) * eps``, ``eps ~ N(0, I)``
    (reparameterised), in evaluation ``z = mean``. An MLP decoder ``latent_dim ->
    decoder_hidden... -> in_dim`` reconstructs the clean input ``Batch.extras[keys.INPUT]``
    (``[B, ...]`` of ``in_dim`` values; :attr:`inputs` is the view transform that passes it on),
    and :func:`cmim_loss` gives A-MIM plus ``contrastive_weight`` times the contrastive term, whose
    candidates are every rank's encoding distributions when ``gather`` resolves to on. A batch of
    one sample has no negative: its contrastive term is ``log 1 = 0``."""

    requires = {"views": 1, "extras": (keys.INPUT,)}
    batch_coupled = True

    def __init__(self, in_dim: Annotated[int | None, Ge(1), FromData("in_dim")] = None,
                 embed_dim: Annotated[int, Ge(1)] = 64, latent_dim: Annotated[int, Ge(1)] = 16,
                 decoder_hidden: tuple[Annotated[int, Ge(1)], ...] | list[int] = (64,),
                 decoder_std: Annotated[float, Gt(0)] = 1.0,
                 contrastive_weight: Annotated[float, Ge(0)] = 1.0, gather: Gather = "auto"):
        super().__init__()
        self.in_dim = in_dim or 64
        self.embed_dim, self.latent_dim = embed_dim, latent_dim
        self.decoder_std, self.contrastive_weight, self.gather = decoder_std, contrastive_weight, gather
        self.mean = nn.Linear(embed_dim, latent_dim)
        self.log_std = nn.Linear(embed_dim, latent_dim)
        self.decoder = mlp_layers([latent_dim, *decoder_hidden, self.in_dim], activation="relu",
                                  batch_norm=False)

    @property
    def inputs(self) -> Transform:
        """The view transform that writes the clean input into ``Batch.extras[keys.INPUT]``."""
        return _PassInput()

    def encode(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)`` of ``q(z|x)``, each ``[B, latent_dim]``."""
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.mean.weight.dtype)
        return self.mean(h), LOG_STD_BOUND * torch.tanh(self.log_std(h) / LOG_STD_BOUND)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'contrastive_mim'"
        h, x = views.embeddings[0], batch.extras[keys.INPUT]
        if h.dim() != 2 or h.shape[1] != self.embed_dim:
            raise ShapeError(f"{owner}: Views.embeddings[0] must be the encoder's output "
                             f"[B, {self.embed_dim}] (embed_dim), got {list(h.shape)}")
        if (not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2
                or x.shape[0] != h.shape[0] or x[0].numel() != self.in_dim):
            shape = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{owner}: Batch.extras[{keys.INPUT!r}] must be the floating input of "
                             f"{h.shape[0]} rows of {self.in_dim} values (in_dim), got {shape}")
        mean, log_std = self.encode(h)
        z = mean + torch.exp(log_std) * torch.randn_like(mean) if self.training else mean
        x_hat = self.decoder(z)
        candidates, offset = (mean, log_std), 0
        if resolve_gather(self.gather) and world_size() > 1:
            candidates, offset = (gather_with_grad(mean), gather_with_grad(log_std)), rank() * h.shape[0]
        per_sample, mim, contrastive = cmim_loss(
            x.flatten(1), x_hat, z, mean, log_std, decoder_std=self.decoder_std,
            contrastive_weight=self.contrastive_weight, candidates=candidates, offset=offset)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"mim": mim.mean().detach(), "contrastive": contrastive.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        h = torch.randn(batch_size, self.embed_dim, generator=generator).requires_grad_()
        x = torch.rand(batch_size, self.in_dim, generator=generator)
        return Views(embeddings=(h,)), Batch(index=torch.arange(batch_size), extras={keys.INPUT: x})


class _PassInput(Transform):
    """``(x, batch) -> (x, batch + {keys.INPUT: x.detach()})``."""

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        return x, batch.evolve(extras={**batch.extras, keys.INPUT: x.detach()})


CARD = Card(
    name="contrastive_mim", kind="objective",
    title="cMIM: A Contrastive Mutual Information Framework for Unified Generative and "
          "Discriminative Representation Learning",
    paper="arXiv:2502.19642",
    summary="A Gaussian encoder-decoder trained with the asymmetric Mutual Information Machine "
            "loss (reconstruction, prior and the encoder's own log density, which maximises "
            "mutual information and clusters codes) plus an augmentation-free contrastive term: "
            "each sample's code must be likelier under its own posterior than under the other "
            "samples' posteriors in the batch.",
    formula="q(z|x) = N(mu(h), sigma(h)^2), log sigma = 7 tanh(W_s h / 7), "
            "z = mu + sigma * eps (mu in evaluation); "
            "L_MIM = -1/2 (log N(x; dec(z), s^2 I) + log N(z; 0, I) + log q(z|x)); "
            "L_C = -log(q(z_i|x_i) / sum_j q(z_i|x_j)); L = mean_i L_MIM + w L_C, w = 1, s = 1",
    left_out="The A-MIM loss (-1/2 [log p(x|z) + log p(z) + log q(z|x)]) matches the MIM authors' "
             "code. The exact form of cMIM's contrastive term, its weight and temperature could not "
             "be read from the paper here (only its abstract was reachable): the term implemented "
             "is an InfoNCE whose logits are the encoders' log densities log q(z_i|x_j) (no "
             "augmented positives, the sample's own posterior is the positive), weight 1. The "
             "'informative embeddings' (decoder hidden states as features), the transformer "
             "encoder-decoders for molecules and images and the paper's data are not here; the "
             "Gaussian decoder has a fixed std (1), and the latent size 16 and decoder MLP are "
             "this module's defaults.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ContrastiveMIM, card=CARD)
