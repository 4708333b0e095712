"""Adaptive Multi-head Contrastive Learning (AMCL), SimCLR form (Eq. 2.1, top-k as in the authors' code).

Wang, Koniusz, Gedeon, Zheng, "Adaptive Multi-head Contrastive Learning", ECCV 2024
(arXiv:2310.05615).

``C`` projection heads map the backbone features of every view to ``z^c``; each head scores
every pair with its own cosine similarity ``s^c_ij`` and a pair-adaptive temperature
``tau^c_ij = eta + iota * sigmoid(-phi(z^c_i) . phi(z^c_j))`` from a temperature network
``phi`` shared by the heads (``eta = tau_min``, ``iota = tau_max - tau_min``). The loss is a
sum of separate head-wise terms (maximum likelihood over the product of head-wise
posteriors); for SimCLR each term contrasts the positive with the hardest negatives, in the
top-k form of the authors' code (the paper's Eq. 2.1 takes the single hardest, ``k = 1``):

    l_i = sum_c [ -s^c_ip / tau^c_ip + beta Omega(tau^c_ip)
                  + mean_{n in K^c_i} s^c_in / tau^c_in
                  - beta sum_{n in K^c_i} (log(tau^c_in) + 1 / tau^c_in) ],
    K^c_i = the k negatives of i of largest s^c_in,      Omega(tau) = (d'/2) log(tau) + 1 / tau,

where ``d'`` is the head dimension; the regularisers keep temperatures away from degenerate
values (the negatives' has no ``d'/2`` factor, as in the authors' code). An anchor with
several positives averages the positive part over them; one with fewer than ``k`` negatives
uses all of them; anchors without a positive or a negative are left out of the mean over anchors.
The heads and ``phi`` belong to the objective: the engine optimises them with the model.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Sampler
from sdk.layers import check_features, mlp_layers
from sdk.types import Batch, Loss, Views


def temperature_regulariser(tau: Tensor, dim: int) -> Tensor:
    """``Omega(tau) = (dim / 2) log(tau) + 1 / tau`` (elementwise)."""
    return 0.5 * dim * tau.log() + tau.reciprocal()


def negative_regulariser(tau: Tensor) -> Tensor:
    """``log(tau) + 1 / tau`` (elementwise): the regulariser of each selected negative."""
    return tau.log() + tau.reciprocal()


def adaptive_multihead_loss(sims: Tensor, taus: Tensor, positive: Tensor, negative: Tensor, *,
                            beta: float = 1e-4, dim: int = 128, topk: int = 100) -> tuple[Tensor, Tensor]:
    """Per-anchor AMCL loss ``[A]`` (summed over heads) and the anchors that have a positive
    and a negative, from head-wise similarities and temperatures [C, A, N] and boolean pair
    masks [A, N]: ``sum_c [mean_p (-s^c_ip/tau^c_ip + beta Omega(tau^c_ip))
    + mean_{n in K} s^c_in/tau^c_in - beta sum_{n in K} (log tau^c_in + 1/tau^c_in)]`` with ``K``
    the ``topk`` negatives of largest ``s^c_in`` (all of them when there are fewer)."""
    if sims.shape != taus.shape or sims.dim() != 3:
        raise ShapeError(f"adaptive_multihead_loss: sims {list(sims.shape)} and taus "
                         f"{list(taus.shape)} must both be [heads, anchors, candidates]")
    if positive.shape != sims.shape[1:] or negative.shape != sims.shape[1:]:
        raise ShapeError(f"adaptive_multihead_loss: masks {list(positive.shape)}/"
                         f"{list(negative.shape)} must be [anchors, candidates] "
                         f"{list(sims.shape[1:])}")
    dtype = torch.promote_types(sims.dtype, torch.float32)
    sims, taus = sims.to(dtype), taus.to(dtype)
    pos_w = positive.to(sims.dtype)
    n_pos = pos_w.sum(dim=-1)
    valid = (n_pos > 0) & negative.any(dim=-1)
    pair = beta * temperature_regulariser(taus, dim) - sims / taus            # [C, A, N]
    pos_term = (pair * pos_w).sum(dim=-1) / n_pos.clamp_min(1.0)             # [C, A]
    k = min(topk, sims.shape[-1])
    hardest = sims.detach().masked_fill(~negative, torch.finfo(sims.dtype).min / 2)
    hardest = hardest.topk(k, dim=-1).indices                                 # [C, A, k]
    chosen = negative.expand_as(sims).gather(-1, hardest).to(sims.dtype)      # real negatives
    s_k, t_k = sims.gather(-1, hardest), taus.gather(-1, hardest)
    neg_term = ((s_k / t_k * chosen).sum(dim=-1) / chosen.sum(dim=-1).clamp_min(1.0)
                - beta * (negative_regulariser(t_k) * chosen).sum(dim=-1))   # [C, A]
    loss = (pos_term + neg_term).sum(dim=0)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


class AdaptiveMultiheadContrastive(Objective):
    """AMCL over any number of views; see the module docstring for the formula.

    ``Views.embeddings`` are backbone features ``[B, in_dim]``; each of the ``num_heads`` heads
    is ``Linear(in_dim, hidden_dim) -> BN -> ReLU -> Linear(hidden_dim, out_dim)``. Temperatures
    lie in ``[tau_min, tau_max]`` (``eta = tau_min``, ``iota = tau_max - tau_min``); ``phi`` is
    ``Linear -> ReLU -> Linear`` on the normalised head outputs (``temperature_hidden_dim``
    units, default ``out_dim``). ``topk`` hardest negatives per anchor and head (``topk=1``:
    Eq. 2.1's single hardest). Defaults follow the authors' SimCLR runs (``beta = 1e-4``,
    ``topk = 100``, ``out_dim = 128``). A Sampler (default: same index) chooses the pairs; it
    sees the first head's embeddings; only its masks are consumed (no pair weights, no extra
    negatives). ``gather`` ("auto": under DDP) contrasts against every rank; the heads'
    BatchNorm layers normalise with each rank's own batch unless converted with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``; in training mode they need a batch of
    at least 2 (a batch of one raises :class:`sdk.ShapeError`).
    """

    requires = {"views": 2}
    consumes = frozenset({Input.PAIRS})
    batch_coupled = True
    accepts_sampler = True

    def __init__(self, in_dim: Annotated[int, Ge(1)] = 512, hidden_dim: Annotated[int, Ge(1)] = 512,
                 out_dim: Annotated[int, Ge(1)] = 128, num_heads: Annotated[int, Ge(1)] = 3,
                 beta: Annotated[float, Ge(0)] = 1e-4, tau_min: Annotated[float, Gt(0)] = 1e-5,
                 tau_max: float = 2.0, temperature_hidden_dim: Annotated[int, Ge(1)] | None = None,
                 topk: Annotated[int, Ge(1)] = 100, sampler: Sampler | None = None,
                 gather: Gather = "auto"):
        super().__init__()
        if not tau_min < tau_max:
            raise ConfigError("adaptive_multihead_contrastive: need tau_min < tau_max, got "
                              f"tau_min={tau_min}, tau_max={tau_max}", param="tau_min")
        t_hidden = out_dim if temperature_hidden_dim is None else temperature_hidden_dim
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.beta, self.tau_min, self.tau_max, self.topk = beta, tau_min, tau_max, topk
        self.heads = nn.ModuleList(mlp_layers([in_dim, hidden_dim, out_dim]) for _ in range(num_heads))
        self.phi = nn.Sequential(nn.Linear(out_dim, t_hidden), nn.ReLU(), nn.Linear(t_hidden, out_dim))
        self.sampler = sampler
        self.gather = gather

    def pair_temperatures(self, anchors: Tensor, candidates: Tensor) -> Tensor:
        """``tau_ij = tau_min + (tau_max - tau_min) sigmoid(-phi(a_i) . phi(c_j))`` [A, N]."""
        score = self.phi(anchors) @ self.phi(candidates).T
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(-score)

    def forward(self, views: Views, batch: Batch) -> Loss:
        dtype = self.heads[0][0].weight.dtype
        feats = tuple(h.to(dtype) for h in views.embeddings)
        check_features(f"objective {self.name!r}", "Views.embeddings", feats[0], self.in_dim,
                       module=self.heads[0], batch_norm=True)
        sims, taus, first = [], [], None
        for head in self.heads:
            projected = Views(embeddings=tuple(head(h) for h in feats))
            c = contrastive.contrast(projected, batch, gather=self.gather)
            if first is None:
                first = c
            sims.append(c.anchors @ c.candidates.T)
            taus.append(self.pair_temperatures(c.anchors, c.candidates))
        if self.sampler is None:
            positive, negative = contrastive.same_index_masks(first)
        else:
            pairs = contrastive.sampler_pairs(first, self.sampler)
            positive, negative = pairs.positive, pairs.negative
        sims_t, taus_t = torch.stack(sims), torch.stack(taus)
        loss, valid = adaptive_multihead_loss(sims_t, taus_t, positive, negative,
                                              beta=self.beta, dim=self.out_dim, topk=self.topk)
        with torch.no_grad():
            tau = taus_t.to(loss.dtype)
            logs = {"tau_positive": (tau * positive).sum() / positive.sum().clamp_min(1) / self.num_heads,
                    "tau_negative": (tau * negative).sum() / negative.sum().clamp_min(1) / self.num_heads}
        return Loss(value=contrastive.masked_mean(loss, valid, first),
                    per_sample=contrastive.per_sample(loss, first), logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        feats = tuple(torch.randn(batch_size, self.in_dim, generator=generator).requires_grad_()
                      for _ in range(2))
        return Views(embeddings=feats), Batch(targets=torch.arange(batch_size) % 5)


CARD = Card(
    name="adaptive_multihead_contrastive", kind="objective",
    title="Adaptive Multi-head Contrastive Learning", paper="arXiv:2310.05615",
    summary="Several projection heads owned by the objective, each scoring pairs with a "
            "pair-adaptive temperature from a shared network, regularised by Omega(tau); "
            "one contrastive term per head (positive against the top-k hardest negatives, as in "
            "the authors' code; topk=1 is Eq. 2.1's single hardest), summed over heads.",
    formula="l_i = sum_c [-s^c_ip/tau^c_ip + beta Omega(tau^c_ip) + mean_{n in K} s^c_in/tau^c_in "
            "- beta sum_{n in K} (log tau^c_in + 1/tau^c_in)], K = the topk negatives of largest s^c_in, "
            "Omega(tau) = (d'/2) log tau + 1/tau, "
            "tau^c_ij = tau_min + (tau_max - tau_min) sigmoid(-phi(z^c_i).phi(z^c_j)); "
            "positive part averaged over an anchor's positives; loss = mean_i l_i; "
            "beta=1e-4, topk=100 (the authors' SimCLR runs)",
    left_out="The paper's MoCo, SimSiam, Barlow Twins and InfoNCE (LGP/CAN) variants (Eqs. 2.2-2.4); "
             "memory-bank negatives in Views.extras are not used (in-batch negatives only). The "
             "negatives follow the authors' code (top-k mean of s/tau, regulariser summed over the "
             "top k without the d'/2 factor), not the max with Omega of Eq. 2.1.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AdaptiveMultiheadContrastive, card=CARD)
