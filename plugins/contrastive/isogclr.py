"""iSogCLR: contrastive learning with individualised temperatures learned by DRO.

Qiu et al., "Not All Semantics are Created Equal: Contrastive Self-supervised Learning with
Automatic Temperature Individualization", ICML 2023 (arXiv:2305.11965). Update rules follow the
authors' unimodal code (``SogCLR_DRO_Loss``) and LibAUC's ``GCLoss_v1``.
"""

from __future__ import annotations

import math
from typing import Annotated

import attrs
import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, resolve_gather
from sdk.errors import ConfigError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Sampler
from sdk.types import Batch, Loss, Views, check_ids


@attrs.frozen(kw_only=True)
class ISogCLRStep:
    """Per-anchor results of one iSogCLR step (see :func:`isogclr_loss`)."""

    loss: Tensor
    valid: Tensor
    log_s: Tensor
    tau_grad: Tensor


def isogclr_loss(sims: Tensor, positive: Tensor, negative: Tensor, tau: Tensor, *,
                 log_s_prev: Tensor | None = None, seen: Tensor | None = None,
                 gamma: float = 0.9, rho: float = 0.3,
                 weight: Tensor | None = None, extra_sims: Tensor | None = None,
                 extra_mask: Tensor | None = None) -> ISogCLRStep:
    """One stochastic step of the robust global contrastive loss, per anchor ``a``.

    ``sims`` [A, N] are cosine similarities (with gradient), ``tau`` [A] the anchors'
    temperatures, ``log_s_prev`` [A] the log of each anchor's moving average and ``seen`` [A]
    whether it holds one (None: every anchor's first visit, ``s_a = g_a``).
    With ``g_a = mean_{j in N(a)} exp(s_aj / tau_a)`` over the negatives (and extra negatives)::

        s_a    = (1 - gamma) s_a_prev + gamma g_a                     (moving average)
        p_aj   = exp(s_aj / tau_a) / s_a                              (detached)
        grad_w : mean_j p_aj s_aj - mean_{p in P(a)} s_ap             (surrogate, gives the gradient)
        value  : tau_a log s_a - mean_p s_ap + rho tau_a              (= tau log E exp(h/tau) + rho tau)
        d tau_a = log s_a + rho - mean_j p_aj s_aj / tau_a

    Everything runs in log space, so any temperature is safe. Returns :class:`ISogCLRStep` with
    ``loss`` (value as above, gradient of the surrogate), ``valid`` (anchor has positives and
    negatives), ``log_s`` and ``tau_grad``.
    """
    sims = sims.float()
    lt = sims.detach() / tau[:, None]
    neg_w = negative.float() if weight is None else negative * weight.float()
    pos_w = positive.float() if weight is None else positive * weight.float()
    count = neg_w.sum(-1)
    log_sum = contrastive.masked_logsumexp(lt, negative, weight)
    if extra_sims is not None:
        extra_t = extra_sims.detach().float() / tau[:, None]
        ok = torch.ones_like(extra_t, dtype=torch.bool) if extra_mask is None else extra_mask
        log_sum = torch.logaddexp(log_sum, contrastive.masked_logsumexp(extra_t, ok))
        count = count + ok.sum(-1)
    n_pos = pos_w.sum(-1)
    valid = (count > 0) & (n_pos > 0)
    tiny = torch.finfo(torch.float32).tiny
    log_s = log_sum - count.clamp_min(1).log()
    if log_s_prev is not None and gamma < 1.0:
        mixed = torch.logaddexp(math.log1p(-gamma) + log_s_prev.float(), math.log(gamma) + log_s)
        log_s = mixed if seen is None else torch.where(seen, mixed, log_s)
    p = torch.exp(lt - log_s[:, None]) * neg_w
    weighted = (p * sims).sum(-1)
    weighted_t = (p * lt).sum(-1)
    if extra_sims is not None:
        pe = torch.exp(extra_t - log_s[:, None]) * ok
        weighted = weighted + (pe * extra_sims.float()).sum(-1)
        weighted_t = weighted_t + (pe * extra_t).sum(-1)
    n = count.clamp_min(1)
    pos = (pos_w * sims).sum(-1) / n_pos.clamp_min(tiny)
    surrogate = weighted / n - pos
    value = tau * log_s - pos + rho * tau
    loss = surrogate + (value - surrogate).detach()
    tau_grad = log_s + rho - weighted_t / n
    zero = torch.zeros_like(loss)
    return ISogCLRStep(loss=torch.where(valid, loss, zero), valid=valid, log_s=log_s,
                       tau_grad=torch.where(valid, tau_grad, zero))


class ISogCLR(Objective):
    """Robust global contrastive loss with a learned temperature per training sample::

        min_w min_{tau_min <= tau_i <= tau_max} 1/n sum_i tau_i log E_{z in S_i^-} exp(h_i(z)/tau_i)
                                                          + rho tau_i,   h_i(z) = s(i, z) - s(i, i+)

    (the KL-constrained DRO dual). Per sample (``Batch.index``) buffers hold the moving average
    ``s_i`` (log space), the temperature ``tau_i`` and the momentum ``u_i`` of its gradient,
    shared by the sample's views. Each training forward (module in train mode, grad enabled)
    runs the paper's Algorithm 1 on them: ``s_i`` is updated with ``gamma`` (first visit:
    ``s_i = g_i``), the loss's gradient is the paper's ``G(w)`` for the engine's optimizer, then
    ``u_i <- (1 - beta) u_i + beta clip(d tau_i)`` and ``tau_i <- clamp(tau_i - eta u_i, tau_min,
    tau_max)``. Sampler masks, synthetic and memory negatives, and ``gather`` work as in
    ``nt_xent``. ``num_samples`` must exceed every dataset index (on CPU an index outside
    ``[0, num_samples)`` raises :class:`sdk.ShapeError`). A batch of one sample has no
    negatives (no ``g_i`` to estimate): it raises :class:`sdk.ShapeError`.
    """

    requires = {"views": 2, "index": True}
    consumes = frozenset({Input.PAIRS, Input.PAIR_WEIGHTS, Input.EXTRA_NEGATIVES})
    batch_coupled = True
    accepts_sampler = True

    def __init__(self, num_samples: Annotated[int, Ge(1)] = 65536, temperature: float = 0.1,
                 gamma: Annotated[float, Interval(gt=0, le=1)] = 0.9, rho: Annotated[float, Ge(0)] = 0.3,
                 eta: Annotated[float, Ge(0)] = 0.01, beta: Annotated[float, Interval(gt=0, le=1)] = 0.9,
                 tau_min: Annotated[float, Gt(0)] = 0.05, tau_max: float = 0.7,
                 grad_clip: Annotated[float, Gt(0)] = 3.0, sampler: Sampler | None = None,
                 gather: Gather = "auto"):
        super().__init__()
        if not tau_min <= tau_max:
            raise ConfigError(f"isogclr: need tau_min <= tau_max, got tau_min={tau_min!r}, "
                              f"tau_max={tau_max!r}", param="tau_min")
        if not tau_min <= temperature <= tau_max:
            raise ConfigError(f"isogclr: temperature={temperature!r} must be in [tau_min={tau_min!r}, "
                              f"tau_max={tau_max!r}]", param="temperature")
        self.num_samples, self.temperature = num_samples, temperature
        self.gamma, self.rho, self.eta, self.beta = gamma, rho, eta, beta
        self.tau_min, self.tau_max, self.grad_clip = tau_min, tau_max, grad_clip
        self.sampler, self.gather = sampler, gather
        self.register_buffer("tau", torch.full((num_samples,), float(temperature)))
        self.register_buffer("log_s", torch.zeros(num_samples))
        self.register_buffer("u", torch.zeros(num_samples))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))

    def on_fit_start(self, state: State) -> None:
        dataset = getattr(state.trainer.train_loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) > self.num_samples:
            raise ConfigError(f"isogclr: num_samples={self.num_samples} is smaller than the training "
                              f"set ({len(dataset)} samples)", param="num_samples")

    def forward(self, views: Views, batch: Batch) -> Loss:
        c = contrastive.contrast(views, batch, gather=self.gather)
        contrastive.require_negatives(c, self.name)
        if self.sampler is None:
            positive, negative = contrastive.same_index_masks(c)
            pairs, weight = None, None
        else:
            pairs = contrastive.sampler_pairs(c, self.sampler)
            positive, negative, weight = pairs.positive, pairs.negative, pairs.weight
        extra, extra_mask = contrastive.extra_negatives(c, pairs)
        index = contrastive.anchor_index(c)
        try:  # index_select, unlike indexing, refuses negative ids (on CPU; CUDA asserts)
            tau, log_s, seen = (t.index_select(0, index) for t in (self.tau, self.log_s, self.seen))
        except (IndexError, RuntimeError):
            check_ids(f"objective {self.name!r}", "Batch.index", batch.index, self.num_samples)
            raise
        step = isogclr_loss(c.anchors @ c.candidates.T, positive, negative, tau,
                            log_s_prev=log_s, seen=seen, gamma=self.gamma,
                            rho=self.rho, weight=weight,
                            extra_sims=extra, extra_mask=extra_mask)
        if self.training and torch.is_grad_enabled():
            self._update(c, batch.index, step)
        return Loss(value=contrastive.masked_mean(step.loss, step.valid, c),
                    per_sample=contrastive.per_sample(step.loss, c),
                    logs={"tau": tau.mean().detach()})

    @torch.no_grad()
    def _update(self, c: contrastive.Contrast, index: Tensor, step: ISogCLRStep) -> None:
        """Average the anchors' estimates over each sample's views, then Algorithm 1's updates."""
        shape = (c.n_views, c.batch_size)
        valid = step.valid.view(shape)
        n_valid = valid.sum(0)
        log_s = torch.where(valid, step.log_s.view(shape), -torch.inf).logsumexp(0)
        log_s = log_s - n_valid.clamp_min(1).log()
        grad = (step.tau_grad.view(shape) * valid).sum(0) / n_valid.clamp_min(1)
        grad = grad.clamp(-self.grad_clip, self.grad_clip)
        if resolve_gather(self.gather):
            index, log_s, grad, n_valid = (gather_no_grad(t) for t in (index, log_s, grad, n_valid))
        ok = n_valid > 0
        u = (1.0 - self.beta) * self.u[index] + self.beta * grad
        tau = (self.tau[index] - self.eta * u).clamp(self.tau_min, self.tau_max)
        self.log_s[index] = torch.where(ok, log_s, self.log_s[index])
        self.u[index] = torch.where(ok, u, self.u[index])
        self.tau[index] = torch.where(ok, tau, self.tau[index])
        self.seen[index] = self.seen[index] | ok


CARD = Card(
    name="isogclr", kind="objective",
    title="Not All Semantics are Created Equal: Contrastive Self-supervised Learning with "
          "Automatic Temperature Individualization (iSogCLR)",
    paper="arXiv:2305.11965",
    summary="Robust global contrastive loss with one temperature per training sample, learned by "
            "KL-DRO; per-sample moving averages, temperatures and their gradient momentum are "
            "buffers keyed by Batch.index (checkpointed).",
    formula="F = mean_i tau_i log E_{j in S_i^-} exp((s_ij - s_ii+)/tau_i) + rho tau_i; "
            "s_i <- (1-gamma) s_i + gamma mean_j exp(s_ij/tau_i); grad_w = mean_j "
            "[exp(s_ij/tau_i)/s_i] grad s_ij - grad s_ii+; u_i <- (1-beta) u_i + beta clip(log s_i "
            "+ rho - mean_j exp(s_ij/tau_i) s_ij/(tau_i^2 s_i)); tau_i <- clamp(tau_i - eta u_i, "
            "tau_min, tau_max)",
    left_out="The moving average tracks E exp(s_ij/tau_i), as the authors' code does (the objective "
             "rewritten as tau log E exp(s/tau) - s_ii+ + rho tau), rather than Algorithm 1's "
             "E exp(h_i/tau_i): the two estimators agree when gamma = 1 and differ by how the "
             "positive similarity moved between visits otherwise. Defaults follow the authors' "
             "LibAUC unimodal loss (tau_init=0.1, gamma=0.9, rho=0.3, eta=0.01, beta=0.9, tau in "
             "[0.05, 0.7]) with the official repository's clip of the temperature gradient at 3; "
             "the loss is a mean over anchors (the official code sums the two views).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ISogCLR, card=CARD)
