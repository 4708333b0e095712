"""MoCHi: synthetic hard negatives mixed from each query's hardest negatives.

Kalantidis, Sariyildiz, Pion, Weinzaepfel & Larlus, "Hard Negative Mixing for Contrastive
Learning", NeurIPS 2020 (arXiv:2010.01028).
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.constraints import one_of
from sdk.contrastive import sample_ids
from sdk.errors import ConfigError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.types import Batch, Pairs, Views

POOLS = ("memory", "batch", "both")


GRAM_BLOCK = 2**23  # pool Gram entries computed at once (32 MiB in float32)
GATHER_CHUNK = 2**15  # pairs whose vectors are gathered at once when the pool is too large for a Gram


def _uniform(shape: tuple[int, ...], low: float, high: float, like: Tensor,
             generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)
    return (low + (high - low) * u).to(like.dtype)


class _Draws(NamedTuple):
    n: Tensor  # [K, D] the pool, L2-normalised (detached)
    z: Tensor  # [A, D] the queries as given (gradients flow through them)
    dots: Tensor  # [A, K] z . n
    inv_norm: Tensor  # [A, 1] 1 / ||z||, detached
    alpha: Tensor  # [A, s]
    i: Tensor  # [A, s] pool rows of the first negative of each pair mix
    j: Tensor  # [A, s] and of the second
    beta: Tensor  # [A, s']
    jq: Tensor  # [A, s'] pool rows of the negative of each query mix
    valid: Tensor  # [A, s + s'] whether the query has any valid negative


def _draw(queries: Tensor, pool: Tensor, pool_mask: Tensor | None, n_hard: int, s: int, s_prime: int,
          generator: torch.Generator | None) -> _Draws:
    """The hardest negatives of each query and the random draws of MoCHi (one topk)."""
    if queries.dim() != 2 or pool.dim() != 2 or queries.shape[1] != pool.shape[1]:
        raise ShapeError(f"hard_negative_mixing: expected queries [A, D] and pool [K, D], got "
                         f"{list(queries.shape)} and {list(pool.shape)}")
    a, k = queries.shape[0], pool.shape[0]
    if pool_mask is not None and tuple(pool_mask.shape) != (a, k):
        raise ShapeError(f"hard_negative_mixing: pool_mask must be [{a}, {k}], got "
                         f"{list(pool_mask.shape)}")
    n32 = F.normalize(pool.detach().float(), dim=-1)
    ranked = F.normalize(queries.detach().float(), dim=-1) @ n32.T  # ranked in float32
    if pool_mask is not None:
        ranked = ranked.masked_fill(~pool_mask, -3.0)  # below every cosine: masked entries sort last
    dtype = torch.promote_types(queries.dtype, torch.float32)
    z = queries.to(dtype)
    n = n32 if dtype == torch.float32 else F.normalize(pool.detach().to(dtype), dim=-1)
    inv_norm = 1 / z.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    top = ranked.topk(min(n_hard, k), dim=1)
    count = (top.values > -2.0).sum(dim=1, keepdim=True) if pool_mask is not None else \
        torch.full((a, 1), top.indices.shape[1], device=z.device)

    def draw(m: int) -> Tensor:  # uniform positions among each query's valid hardest
        u = torch.rand((a, m), generator=generator, device=z.device)
        pos = (u * count).long().clamp_max(count.clamp_min(1) - 1)
        return top.indices.gather(1, pos)

    none = torch.zeros(a, 0, dtype=torch.long, device=z.device)
    alpha, i, j, beta, jq = z.new_zeros(a, 0), none, none, z.new_zeros(a, 0), none
    if s > 0:
        alpha = _uniform((a, s), 0.0, 1.0, z, generator)
        i, j = draw(s), draw(s)
    if s_prime > 0:
        beta = _uniform((a, s_prime), 0.0, 0.5, z, generator)
        jq = draw(s_prime)
    return _Draws(n, z, z @ n.T, inv_norm, alpha, i, j, beta, jq, (count > 0).expand(a, s + s_prime))


def _pair_dots(n: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """``n_i . n_j`` for pool rows ``i``, ``j`` (same shape) without holding all pairs' vectors:
    row blocks of the pool's Gram when it is small next to the number of pairs, else chunks of
    gathered vectors."""
    k, shape = n.shape[0], i.shape
    i, j = i.reshape(-1), j.reshape(-1)
    if k * k > 64 * i.numel():
        return torch.cat([(n[i[c:c + GATHER_CHUNK]] * n[j[c:c + GATHER_CHUNK]]).sum(-1)
                          for c in range(0, i.numel(), GATHER_CHUNK)]).view(shape)
    rows = max(1, GRAM_BLOCK // k)
    out = n.new_zeros(i.shape)
    for r in range(0, k, rows):
        block = n[r:r + rows] @ n.T
        picked = block.view(-1)[(i - r).clamp(0, block.shape[0] - 1) * k + j]
        out = torch.where((i >= r) & (i < r + rows), picked, out)
    return out.view(shape)


def hard_negative_mixing(queries: Tensor, pool: Tensor, pool_mask: Tensor | None = None, *,
                         n_hard: int = 1024, s: int = 1024, s_prime: int = 512,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Similarities of each query with MoCHi's synthetic negatives, and which of them are valid.

    ``queries`` [A, D] (the anchors, as the objective compares them) and ``pool`` [K, D] (the
    negatives, shared by all queries, L2-normalised here); ``pool_mask`` [A, K] says which pool
    entries are negatives of each query (all when None). With ``q_a = normalize(queries_a)``
    and ``Q_a`` the ``n_hard`` entries of largest ``q_a . n`` among them (fewer when fewer are
    valid), the synthetic negatives (detached) are::

        h_k  = normalize(alpha_k n_i + (1 - alpha_k) n_j),  n_i, n_j ~ U(Q_a), alpha_k ~ U(0, 1)
        h'_k = normalize(beta_k q_a + (1 - beta_k) n_j),    n_j ~ U(Q_a),      beta_k ~ U(0, 0.5)

    Returns ``(sims [A, s + s_prime], valid [A, s + s_prime])`` with ``sims = queries_a . h``,
    differentiable in ``queries`` only, from closed forms that never build the vectors
    (:func:`mochi_negatives` builds them from the same draws)::

        queries_a . h_k  = (alpha z_i + (1 - alpha) z_j) / sqrt(alpha^2 + (1 - alpha)^2
                                                                + 2 alpha (1 - alpha) n_i . n_j)
        queries_a . h'_k = (beta queries_a . sg(q_a) + (1 - beta) z_j) / sqrt(beta^2 + (1 - beta)^2
                                                                + 2 beta (1 - beta) sg(q_a . n_j))

    with ``z_i = queries_a . n_i``. A query without any valid negative gets only invalid ones.
    """
    d = _draw(queries, pool, pool_mask, n_hard, s, s_prime, generator)
    parts = []
    if s > 0:
        alpha = d.alpha  # ||h||^2 = alpha^2 + (1 - alpha)^2 + 2 alpha (1 - alpha) n_i . n_j
        norm2 = 1 - 2 * alpha * (1 - alpha) * (1 - _pair_dots(d.n, d.i, d.j))
        mixed = alpha * d.dots.gather(1, d.i) + (1 - alpha) * d.dots.gather(1, d.j)
        parts.append(mixed / norm2.clamp_min(0).sqrt().clamp_min(1e-12))
    if s_prime > 0:
        beta = d.beta
        self_dot = (d.z * F.normalize(d.z.detach(), dim=-1)).sum(dim=-1, keepdim=True)
        norm2 = 1 - 2 * beta * (1 - beta) * (1 - d.dots.detach().gather(1, d.jq) * d.inv_norm)
        mixed = beta * self_dot + (1 - beta) * d.dots.gather(1, d.jq)
        parts.append(mixed / norm2.clamp_min(0).sqrt().clamp_min(1e-12))
    sims = torch.cat(parts, dim=1) if parts else d.dots.new_zeros(queries.shape[0], 0)
    return sims.to(queries.dtype), d.valid


@torch.no_grad()
def mochi_negatives(queries: Tensor, pool: Tensor, pool_mask: Tensor | None = None, *,
                    n_hard: int = 1024, s: int = 1024, s_prime: int = 512,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The synthetic negatives of :func:`hard_negative_mixing` as vectors, for analysis: the same
    draws (same ``generator`` state), ``(negatives [A, s + s_prime, D] detached, valid)``. Holds
    ``A (s + s_prime) D`` numbers; training uses the similarities instead."""
    d = _draw(queries.detach(), pool, pool_mask, n_hard, s, s_prime, generator)
    q = F.normalize(d.z, dim=-1)
    out = []
    if s > 0:
        alpha = d.alpha[..., None]
        out.append(F.normalize(alpha * d.n[d.i] + (1 - alpha) * d.n[d.j], dim=-1))
    if s_prime > 0:
        beta = d.beta[..., None]
        out.append(F.normalize(beta * q[:, None, :] + (1 - beta) * d.n[d.jq], dim=-1))
    synthetic = torch.cat(out, dim=1) if out else q.new_zeros(q.shape[0], 0, q.shape[1])
    return synthetic.to(queries.dtype), d.valid


class HardNegativeMixing(Sampler):
    """MoCHi (:func:`hard_negative_mixing`) as a pair Sampler: instance-discrimination pairs
    (other views of the sample positive, views of other samples negative) plus the similarities
    of each anchor with its ``s + s_prime`` synthetic negatives in ``Pairs.extra_negative_sims``
    (the vectors are never built), which ``nt_xent`` appends to each anchor's denominator
    (``exp(q . h / t)``, no gradient through ``h``).

    ``pool``: where the hardest negatives come from: ``"memory"`` (the paper: a queue or memory
    bank teacher's ``Views.extras["negatives"]``, valid entries of other samples only; while
    it is empty every synthetic negative is masked out; ``on_fit_start`` checks that the trainer
    has such a teacher),
    ``"batch"`` (views of the other samples of the batch) or ``"both"``. ``seed`` fixes the
    draws with an own generator (its state is checkpointed); None draws from torch's global RNG.
    """

    produces = frozenset({Input.PAIRS, Input.EXTRA_NEGATIVES})

    def __init__(self, n_hard: Annotated[int, Ge(1)] = 1024, s: Annotated[int, Ge(0)] = 1024,
                 s_prime: Annotated[int, Ge(0)] = 512, pool: Annotated[str, one_of(POOLS)] = "memory",
                 seed: int | None = None):
        super().__init__()
        self.n_hard, self.s, self.s_prime, self.pool, self.seed = n_hard, s, s_prime, pool, seed
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def get_extra_state(self) -> Any:
        if self._generator is not None:
            return {"rng": self._generator.get_state()}
        return {"rng": self._pending_state}

    def set_extra_state(self, state: Any) -> None:
        self._generator, self._pending_state = None, state.get("rng")

    def on_fit_start(self, state: State) -> None:
        """A memory pool needs a teacher that publishes one (queue, memory_bank)."""
        teacher = state.trainer.teacher
        if self.pool != "batch" and (teacher is None or contrastive.NEGATIVES not in teacher.memory_keys):
            raise ConfigError(f"hard_negative_mixing: pool={self.pool!r} mixes the negatives of a "
                              "queue or memory_bank teacher, but the trainer has none; add one or "
                              "use pool='batch'", param="pool")

    def _pool(self, views: Views, batch: Batch, z: Tensor) -> tuple[Tensor | None, Tensor | None]:
        parts, masks = [], []
        memory = views.extras.get(contrastive.NEGATIVES) if self.pool != "batch" else None
        if memory is not None:
            index = None if batch.index is None else batch.index.repeat(views.n_views)
            mask = contrastive.memory_mask(views.extras, index, z.shape[0])
            parts.append(memory.detach().to(z.dtype))
            masks.append(torch.ones(z.shape[0], memory.shape[0], dtype=torch.bool, device=z.device)
                         if mask is None else mask)
        if self.pool in ("batch", "both"):
            ids = sample_ids(views)
            parts.append(z.detach())
            masks.append(ids[:, None] != ids[None, :])
        if not parts:
            return None, None
        return torch.cat(parts), torch.cat(masks, dim=1)

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        ids = sample_ids(views)
        same = ids[:, None] == ids[None, :]
        if self.s + self.s_prime == 0:
            return Pairs(positive=same, negative=~same)
        z = torch.cat(views.embeddings)
        pool, mask = self._pool(views, batch, z)
        if pool is None:  # the memory holds nothing yet: no valid synthetic negative
            sims = z.detach().new_zeros(z.shape[0], self.s + self.s_prime)
            valid = torch.zeros(sims.shape, dtype=torch.bool, device=z.device)
        else:
            sims, valid = hard_negative_mixing(z, pool, mask, n_hard=self.n_hard, s=self.s,
                                               s_prime=self.s_prime, generator=self._rng(z.device))
        return Pairs(positive=same, negative=~same, extra_negative_sims=sims, extra_negative_mask=valid)

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        views = Views(embeddings=tuple(torch.randn(batch_size, 16, generator=generator)
                                       for _ in range(2)),
                      extras={"negatives": F.normalize(torch.randn(32, 16, generator=generator), dim=1)})
        return views, Batch(index=torch.arange(batch_size))


CARD = Card(
    name="hard_negative_mixing", kind="sampler",
    title="Hard Negative Mixing for Contrastive Learning (MoCHi)",
    paper="arXiv:2010.01028",
    summary="Per query, mixes pairs of its N hardest negatives (queue/memory and/or in-batch) and "
            "the query with hard negatives into s + s' synthetic, detached, L2-normalised "
            "negatives that join the InfoNCE denominator.",
    formula="Q_a = top-N_{n in negatives(a)} q_a.n; h = normalize(alpha n_i + (1-alpha) n_j), "
            "n_i, n_j ~ U(Q_a), alpha ~ U(0,1) (s of them); h' = normalize(beta q_a + (1-beta) "
            "n_j), beta ~ U(0, 0.5) (s' of them); l_a = -log e^{q.k+/t} / (sum_{n} e^{q.n/t} + "
            "sum_{h, h'} e^{q.sg(h)/t}); defaults N=1024, s=1024, s'=512",
    left_out="The MoCo-v2 queue and momentum encoder themselves (the queue teacher supplies "
             "them), the paper's ImageNet schedules and its per-configuration (N, s, s') sweeps; "
             "mixing runs from the first step (no warm-up epochs). N is capped by the number of "
             "valid negatives of each query.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(HardNegativeMixing, card=CARD)
