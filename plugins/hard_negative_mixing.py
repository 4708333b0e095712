"""MoCHi: synthetic hard negatives mixed from each query's hardest negatives.

Kalantidis, Sariyildiz, Pion, Weinzaepfel & Larlus, "Hard Negative Mixing for Contrastive
Learning", NeurIPS 2020 (arXiv:2010.01028).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from plugins.same_index import sample_ids
from sdk import contrastive
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Sampler
from sdk.types import Batch, Pairs, Views

POOLS = ("memory", "batch", "both")


def _uniform(shape: tuple[int, ...], low: float, high: float, like: Tensor,
             generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)
    return (low + (high - low) * u).to(like.dtype)


@torch.no_grad()
def hard_negative_mixing(queries: Tensor, pool: Tensor, pool_mask: Tensor | None = None, *,
                         n_hard: int = 1024, s: int = 1024, s_prime: int = 512,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MoCHi's synthetic negatives of each query (detached), and which of them are valid.

    ``queries`` [A, D] and ``pool`` [K, D] (the negatives, shared by all queries) are
    L2-normalised here; ``pool_mask`` [A, K] says which pool entries are negatives of each
    query (all when None). With ``Q_a`` the ``n_hard`` entries of largest ``q_a . n`` among
    them (fewer when fewer are valid)::

        h_k  = normalize(alpha_k n_i + (1 - alpha_k) n_j),  n_i, n_j ~ U(Q_a), alpha_k ~ U(0, 1)
        h'_k = normalize(beta_k q_a + (1 - beta_k) n_j),    n_j ~ U(Q_a),      beta_k ~ U(0, 0.5)

    Returns ``(negatives [A, s + s_prime, D], valid [A, s + s_prime])``; a query without any
    valid negative gets only invalid synthetic ones. Vectorised: one ``topk``, one gather.
    """
    if queries.dim() != 2 or pool.dim() != 2 or queries.shape[1] != pool.shape[1]:
        raise ShapeError(f"hard_negative_mixing: expected queries [A, D] and pool [K, D], got "
                         f"{list(queries.shape)} and {list(pool.shape)}")
    a, k = queries.shape[0], pool.shape[0]
    if pool_mask is not None and tuple(pool_mask.shape) != (a, k):
        raise ShapeError(f"hard_negative_mixing: pool_mask must be [{a}, {k}], got "
                         f"{list(pool_mask.shape)}")
    q = F.normalize(queries.detach().float(), dim=-1)
    n = F.normalize(pool.detach().float(), dim=-1)
    sims = q @ n.T
    if pool_mask is not None:
        sims = sims.masked_fill(~pool_mask, -3.0)  # below every cosine: masked entries sort last
    top = sims.topk(min(n_hard, k), dim=1)
    count = (top.values > -2.0).sum(dim=1, keepdim=True) if pool_mask is not None else \
        torch.full((a, 1), top.indices.shape[1], device=q.device)

    def draw(m: int) -> Tensor:  # uniform positions among each query's valid hardest
        u = torch.rand((a, m), generator=generator, device=q.device)
        pos = (u * count).long().clamp_max(count.clamp_min(1) - 1)
        return n[top.indices.gather(1, pos)]  # [A, m, D]

    out = []
    if s > 0:
        alpha = _uniform((a, s, 1), 0.0, 1.0, q, generator)
        out.append(F.normalize(alpha * draw(s) + (1 - alpha) * draw(s), dim=-1))
    if s_prime > 0:
        beta = _uniform((a, s_prime, 1), 0.0, 0.5, q, generator)
        out.append(F.normalize(beta * q[:, None, :] + (1 - beta) * draw(s_prime), dim=-1))
    synthetic = torch.cat(out, dim=1) if out else q.new_zeros(a, 0, q.shape[1])
    valid = (count > 0).expand(a, synthetic.shape[1])
    return synthetic.to(queries.dtype), valid


class HardNegativeMixing(Sampler):
    """MoCHi (:func:`hard_negative_mixing`) as a pair Sampler: instance-discrimination pairs
    (other views of the sample positive, views of other samples negative) plus ``s + s_prime``
    synthetic negatives per anchor in ``Pairs.extra_negatives``, which ``nt_xent`` appends to
    each anchor's denominator (``exp(q . h / t)``, no gradient through ``h``).

    ``pool``: where the hardest negatives come from: ``"memory"`` (the paper: a queue or memory
    bank teacher's ``Views.extras["negatives"]``, valid entries of other samples only; while
    it is empty every synthetic negative is masked out; ``on_fit_start`` checks that the trainer
    has such a teacher),
    ``"batch"`` (views of the other samples of the batch) or ``"both"``. ``seed`` fixes the
    draws with an own generator (its state is checkpointed); None draws from torch's global RNG.
    """

    def __init__(self, n_hard: int = 1024, s: int = 1024, s_prime: int = 512,
                 pool: str = "memory", seed: int | None = None):
        super().__init__()
        if n_hard < 1:
            raise ConfigError(f"hard_negative_mixing: n_hard must be >= 1, got {n_hard}",
                              param="n_hard")
        for name, value in (("s", s), ("s_prime", s_prime)):
            if value < 0:
                raise ConfigError(f"hard_negative_mixing: {name} must be >= 0, got {value}",
                                  param=name)
        if pool not in POOLS:
            raise ConfigError(f"hard_negative_mixing: pool must be one of {', '.join(POOLS)}, "
                              f"got {pool!r}", param="pool")
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

    def on_fit_start(self, trainer: Any) -> None:
        """A memory pool needs a teacher that publishes one (queue, memory_bank)."""
        if self.pool != "batch" and not callable(getattr(trainer.teacher, "memory", None)):
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
            synthetic = z.detach().new_zeros(z.shape[0], self.s + self.s_prime, z.shape[1])
            valid = torch.zeros(synthetic.shape[:2], dtype=torch.bool, device=z.device)
        else:
            synthetic, valid = hard_negative_mixing(z, pool, mask, n_hard=self.n_hard, s=self.s,
                                                    s_prime=self.s_prime,
                                                    generator=self._rng(z.device))
        return Pairs(positive=same, negative=~same, extra_negatives=synthetic,
                     extra_negative_mask=valid)

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
    registry.add("sampler", "hard_negative_mixing", HardNegativeMixing, card=CARD)
