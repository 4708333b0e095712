"""GEDI: a backbone's cluster logits trained at once as an energy-based model of the inputs
(generative) and as a self-supervised clustering of augmented views (discriminative).

Sansone & Manhaeve, "Unifying Self-Supervised Clustering and Energy-Based Models", TMLR 2025
(arXiv:2401.00873; first version "GEDI: GEnerative and DIscriminative Training for
Self-Supervised Learning", arXiv:2212.13425).

For cluster logits ``f(x)`` ``[C]`` of the views ``v = 1..V`` of ``B`` samples, ``p_v =
softmax(f(x_v))`` and the energy ``E(x) = -logsumexp_c f(x)_c``::

    L_gen   = mean_{i, v} E(x_iv) - mean_j E(x~_j)       (x~: SGLD samples of p(x) ~ exp(-E(x)))
    L_inv   = 1/(V (V - 1)) sum_{v != w} mean_i -sum_c p_w(i)_c log p_v(i)_c   (no stop-gradient)
    L_prior = KL(pbar || U) = sum_c pbar_c log(C pbar_c),  pbar = mean_{i, v} p_v(i)
    L       = gen_weight L_gen + inv_weight L_inv + prior_weight L_prior

``x~`` is drawn by stochastic gradient Langevin dynamics from uniform noise:
``x <- x - step_size / 2 * grad_x E(x) + noise * N(0, I)``. The energy term is the
contrastive-divergence estimate of the negative log-likelihood's gradient (JEM's); ``L_inv``
rewards assignments that agree across views and ``L_prior`` the uniform use of the clusters,
which together rule out the collapse of every sample into one cluster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import at_least_float32
from sdk.types import Batch, Loss, Views

OWNER = "objective 'gedi'"
NEGATIVES = "gedi_negatives"
"""``Views.extras``: the cluster logits ``[M, C]`` of the SGLD samples (set by
:meth:`GEDI.after_forward` in training)."""


def energy(logits: Tensor) -> Tensor:
    """``E(x) = -logsumexp_c f(x)_c`` per row ``[N]`` (the EBM whose classifier is ``f``)."""
    return -torch.logsumexp(at_least_float32(logits), dim=-1)


def gedi_terms(logits: Sequence[Tensor], negatives: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``(L_gen, L_inv, L_prior)`` (see the module docstring) of the views' cluster logits
    ``[B, C]`` and the SGLD samples' ``[M, C]`` (None: ``L_gen = 0``)."""
    ls = [at_least_float32(x) for x in logits]
    log_p = [F.log_softmax(x, dim=-1) for x in ls]
    p = [lp.exp() for lp in log_p]
    n = len(ls)
    inv = torch.stack([-(p[w] * log_p[v]).sum(-1).mean() for w in range(n) for v in range(n)
                       if v != w]).mean()
    # log pbar from the log-probabilities: finite (and so is its gradient) where pbar underflows
    stacked = torch.stack(log_p).flatten(0, 1)
    log_pbar = torch.logsumexp(stacked, dim=0) - math.log(stacked.shape[0])
    prior = (log_pbar.exp() * (log_pbar + math.log(log_pbar.shape[0]))).sum()
    if negatives is None:
        gen = inv.new_zeros(())
    else:
        gen = torch.stack([energy(x).mean() for x in ls]).mean() - energy(negatives).mean()
    return gen, inv, prior


def sgld(model: nn.Module, shape: Sequence[int], *, steps: int = 20, step_size: float = 1.0,
         noise: float = 0.01, low: float = -1.0, high: float = 1.0,
         device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """SGLD samples ``[shape]`` of ``p(x) ~ exp(-E(x))``, ``E = -logsumexp(model(x))``: from
    ``U(low, high)``, ``steps`` times ``x <- x - step_size / 2 * grad_x E(x) + noise * eps``
    (torch's global generator; the model in evaluation mode, its parameters untouched).
    Detached."""
    was = model.training
    model.eval()
    try:
        x = torch.empty(tuple(shape), device=device, dtype=dtype).uniform_(low, high)
        for _ in range(steps):
            x = x.detach().requires_grad_()
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(energy(model(x)).sum(), x)
            x = x - step_size / 2 * grad + noise * torch.randn_like(x)
    finally:
        model.train(was)
    return x.detach()


class GEDI(Objective):
    """GEDI (see the module docstring) on the encoder's cluster logits ``[B, C]`` of two or more
    views (``Views.embeddings``: an encoder whose output width is the number of clusters).

    In training under the Trainer, the objective's ``after_forward`` listener draws
    ``num_negatives`` SGLD samples shaped like the first view's inputs
    (``Trainer.view_inputs``), encodes them with the model (gradients reach its parameters)
    and puts their logits in ``Views.extras["gedi_negatives"]``; called directly, give them
    there. Without them (validation, which fires no events) ``L_gen`` is 0. ``gather``
    ("auto": under DDP): ``L_inv`` and ``L_prior`` on the global batch (the marginal
    ``pbar`` couples the samples); the energy term uses each rank's samples."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, gen_weight: Annotated[float, Ge(0)] = 1.0,
                 inv_weight: Annotated[float, Ge(0)] = 1.0,
                 prior_weight: Annotated[float, Ge(0)] = 1.0,
                 sgld_steps: Annotated[int, Ge(1)] = 20,
                 sgld_step_size: Annotated[float, Gt(0)] = 1.0,
                 sgld_noise: Annotated[float, Ge(0)] = 0.01,
                 init_low: float = -1.0, init_high: float = 1.0,
                 num_negatives: Annotated[int | None, Ge(1)] = None, gather: Gather = "auto"):
        super().__init__()
        if init_high <= init_low:
            raise ConfigError(f"gedi: init_high={init_high} must exceed init_low={init_low} (the "
                              "uniform start of SGLD)", param="init_high")
        self.gen_weight, self.inv_weight, self.prior_weight = gen_weight, inv_weight, prior_weight
        self.sgld_steps, self.sgld_step_size, self.sgld_noise = sgld_steps, sgld_step_size, sgld_noise
        self.init_low, self.init_high, self.num_negatives = init_low, init_high, num_negatives
        self.gather = gather

    def after_forward(self, state: Any) -> None:
        """Training: draw the SGLD samples and add their logits to ``state.views``."""
        if not self.training or not self.gen_weight:
            return
        trainer = state.trainer
        x = trainer.view_inputs[0]
        shape = (self.num_negatives or x.shape[0], *x.shape[1:])
        model = trainer.encoder
        neg = sgld(model, shape, steps=self.sgld_steps, step_size=self.sgld_step_size,
                   noise=self.sgld_noise, low=self.init_low, high=self.init_high,
                   device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        views = state.views
        state.views = views.evolve(extras={**views.extras, NEGATIVES: model(neg)})

    def forward(self, views: Views, batch: Batch) -> Loss:
        ls = list(views.embeddings)  # Views holds [B, C] views of one shape
        width = ls[0].shape[1]
        negatives = views.extras.get(NEGATIVES)
        if negatives is not None and (not isinstance(negatives, Tensor) or negatives.dim() != 2
                                      or negatives.shape[1] != width):
            got = list(negatives.shape) if isinstance(negatives, Tensor) else type(negatives).__name__
            raise ShapeError(f"{OWNER}: extras[{NEGATIVES!r}] must be the SGLD samples' logits "
                             f"[M, {width}], got {got}")
        if resolve_gather(self.gather):
            ls = [gather_with_grad(z) for z in ls]
        gen, inv, prior = gedi_terms(ls, negatives)
        value = self.gen_weight * gen + self.inv_weight * inv + self.prior_weight * prior
        return Loss(value=value, logs={"generative": gen.detach(), "invariance": inv.detach(),
                                       "prior": prior.detach()})


CARD = Card(
    name="gedi", kind="objective",
    title="Unifying Self-Supervised Clustering and Energy-Based Models",
    paper="arXiv:2401.00873",
    summary="One backbone's cluster logits as an energy-based model of the inputs (SGLD "
            "negatives) and as a clustering whose assignments agree across views and use "
            "every cluster equally.",
    formula="p_v = softmax(f(x_v)), E(x) = -logsumexp f(x); L_gen = mean E(x) - mean E(x~), "
            "x~ <- x~ - a/2 grad E(x~) + s eps; L_inv = mean_{v != w} -sum_c p_w log p_v; "
            "L_prior = sum_c pbar_c log(C pbar_c); L = w_g L_gen + w_i L_inv + w_p L_prior",
    left_out="Only the abstract of the paper could be consulted, not its equations nor the "
             "authors' code: the three terms are the generic pieces it names (an energy model "
             "trained with SGLD negatives, cluster assignments consistent across views, a uniform "
             "cluster prior), written in their JEM / SwAV-like standard forms; the paper's exact "
             "lower bound and its weights (here 1, 1, 1) are not verified. The SGLD settings are "
             "JEM's (20 steps, step size 1, noise 0.01, uniform start in [-1, 1]); JEM's replay "
             "buffer of past samples is not kept (each step starts from noise). The "
             "neuro-symbolic extension and the image backbones are not part of the loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GEDI, card=CARD)
