"""The negative log-likelihood of an unnormalised model by stochastic compositional optimisation.

Jiang, Qin, Wu, Chen, Yang & Zhang, "Learning Unnormalized Statistical Models via
Compositional Optimization", ICML 2023 (arXiv:2306.07485): for ``p(x) ∝ exp(f(x))`` and a
noise density ``q``, ``NLL = -E_data f(x) + log g``, ``g = E_{x'~q} exp(f(x') - log q(x'))``;
the inner expectation ``g`` is tracked by a moving average ``u <- (1 - gamma) u + gamma g^``
of the mini-batch estimates, and the step follows ``-grad mean f + grad g^ / u`` (the
compositional gradient estimator).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Interval

from sdk import classification as cls
from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather, world_size
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

LOG_Q = "noise_log_density"
"""``Batch.extras[LOG_Q]``: ``log q(x')`` [B] of the noise samples of the second view."""


def log_inner(f_noise: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``log g^ = log mean_j exp(f(x'_j) - log q(x'_j))`` (a logsumexp)."""
    w = f_noise - log_q.to(f_noise.dtype)
    return torch.logsumexp(w, 0) - math.log(w.shape[0])


class CompositionalNLL(Objective):
    """The compositional NLL of an energy model: ``Views.embeddings[0]`` [B, 1] holds ``f`` on
    the data, ``Views.embeddings[1]`` [B, 1] ``f`` on noise samples ``x' ~ q`` (a second view
    whose transform draws them), ``Batch.extras["noise_log_density"]`` [B] their ``log q``.
    ``value`` is the NLL estimate ``-mean f + log u``; its gradient is ``-grad mean f +
    grad g^ / u``. ``u`` (kept as ``log u``) is updated in training mode and checkpointed;
    with ``gather`` the ranks pool their noise estimates, so ``u`` stays equal across them."""

    requires = {"views": 2, "extras": (LOG_Q,)}
    consumes = frozenset()
    batch_coupled = True

    def __init__(self, gamma: Annotated[float, Interval(gt=0, le=1)] = 0.1, gather: Gather = "auto"):
        super().__init__()
        self.gamma, self.gather = gamma, gather
        self.register_buffer("log_u", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, views: Views, batch: Batch) -> Loss:
        data, noise = views.embeddings[0], views.embeddings[1]
        log_q = batch.extras[LOG_Q]
        b = data.shape[0]
        if data.shape != (b, 1) or noise.shape != (b, 1):
            raise ShapeError(f"compositional_nll: Views.embeddings[0] and [1] must be energies f(x) "
                             f"[B, 1], got {list(data.shape)} and {list(noise.shape)}")
        if not isinstance(log_q, torch.Tensor) or log_q.shape != (b,) or not log_q.is_floating_point():
            got = (f"{log_q.dtype} {list(log_q.shape)}" if isinstance(log_q, torch.Tensor)
                   else type(log_q).__name__)
            raise ShapeError(f"compositional_nll: Batch.extras[{LOG_Q!r}] must be floating log-densities "
                             f"[{b}], got {got}")
        f = cls.upcast(data[:, 0])
        log_g = log_inner(cls.upcast(noise[:, 0]), log_q)
        if resolve_gather(self.gather):  # the mean over every rank's noise estimate
            log_g = torch.logsumexp(gather_with_grad(log_g[None]), 0) - math.log(world_size())
        first = self.steps == 0
        kept = (self.log_u.to(log_g.dtype) + math.log1p(-self.gamma) if self.gamma < 1
                else torch.full_like(log_g, -math.inf))
        blended = torch.logaddexp(kept, log_g.detach() + math.log(self.gamma))
        log_u = torch.where(first, log_g.detach(), blended)
        if self.training:
            self.log_u.copy_(log_u.to(self.log_u.dtype))
            self.steps.add_(1)
        ratio = torch.exp(log_g - log_u)
        per_sample = -f + log_u + (ratio - ratio.detach())
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs={"log_u": log_u.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        x = torch.randn(batch_size, 1, generator=generator) + 1.0
        noise = 2 * torch.randn(batch_size, 1, generator=generator)
        log_q = -noise[:, 0] ** 2 / 8 - math.log(2 * math.sqrt(2 * math.pi))
        f_x, f_n = (-(v - 0.5) ** 2 / 2 for v in (x, noise))
        return (Views(embeddings=(f_x.requires_grad_(), f_n.requires_grad_())),
                Batch(extras={LOG_Q: log_q}))


CARD = Card(
    name="compositional_nll", kind="objective",
    title="Learning Unnormalized Statistical Models via Compositional Optimization",
    paper="arXiv:2306.07485",
    summary="Negative log-likelihood of an unnormalised model exp(f): the log partition "
            "function as log of a noise expectation, its inner value tracked by a moving "
            "average, optimised with the compositional gradient (an alternative to NCE).",
    formula="g^ = mean_j exp(f(x'_j) - log q(x'_j)), x' ~ q; u_t = (1 - gamma) u_{t-1} + gamma g^ "
            "(u_1 = g^); value = -mean_i f(x_i) + log u_t; gradient = -grad mean_i f(x_i) + grad g^ / u_t",
    left_out="gamma = 0.1 and one noise sample per data sample (M = B, the noise as a second "
             "view) are the catalogue's, not checked against the paper's experiments. The noise "
             "sampler (a view transform drawing x' ~ q and writing log q to "
             "Batch.extras['noise_log_density']) is the recipe's part; the paper's density "
             "estimation, OOD detection and image generation models are not shipped. u is "
             "kept as log u in float64.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CompositionalNLL, card=CARD)
