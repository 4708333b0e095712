"""Mugs' local-group supervision: each sample is aggregated with its nearest neighbours from a
memory of past features into a local-group embedding, and the student's local group of one
crop predicts the momentum teacher's local group of another, contrasted with a queue.

Zhou, Zhou, Yu, Ding, Tan & Yan, "Mugs: A Multi-Granular Self-Supervised Learning Framework",
2022 (arXiv:2203.14415); formula and defaults from the authors' code (github.com/sail-sg/mugs,
``src/model.py``, ``src/loss.py``, ``src/vision_transformer.py``, ``main.py``).

For a network's pooled feature ``x`` ``[D]`` of a crop and its memory ``M`` (the same network's
features of the first crop of past batches), with ``N_n(x)`` the ``n`` memory entries of largest
cosine with ``x``::

    g(x)     = LN(R([x; N_n(x)])[0])                      (R: one transformer block over the set)
    target   = normalize(proj_t(g_t(x_t)))                (teacher: EMA copy of R, LN, proj)
    pred     = normalize(pred_s(normalize(proj_s(g_s(x_s)))))
    l(p, t)  = -log( exp(p.t / tau) / (exp(p.t / tau) + sum_{q in Q} exp(p.q / tau)) )
    L        = 1/2 (mean_{w, v != w, v global} l + mean_{w, v local} l)

over the teacher's global crops ``w`` and the student's crops ``v``; ``Q`` is a queue of past
targets. The memories and the queue receive this batch after the loss (no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, resolve_gather
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.momentum import EMATeacher
from sdk.ssl import at_least_float32, check_teacher
from sdk.types import Batch, Loss, Views

OWNER = "objective 'mugs_local_group'"


def top_neighbours(query: Tensor, memory: Tensor, n: int, norms: Tensor | None = None) -> Tensor:
    """``[B, n]``: the indices of the ``n`` memory rows ``[K, D]`` of largest cosine with each
    query ``[B, D]``, most similar first; ``norms`` ``[K]``: the rows' norms, when known. The
    memory is divided by its norms after the product (``[B, K]``), not normalised row by row
    (``[K, D]``). No gradient."""
    with torch.no_grad():
        memory = memory.to(query.dtype)
        if norms is None:
            norms = torch.linalg.vector_norm(memory, dim=-1)
        cos = (F.normalize(query.detach(), dim=-1) @ memory.T) / norms.clamp_min(1e-12)
        return torch.topk(cos, n, dim=-1).indices


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """``Linear(no bias) -> GELU`` between the widths, a bare ``Linear`` last (Mugs' heads)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class LocalGroup(nn.Module):
    """``normalize(proj(LN(R([x; neighbours])[0])))``: the relation block ``R`` (one pre-norm
    transformer block, ``heads`` heads, MLP ratio 4, no positions: a function of the set of
    neighbours), a layer norm and the projector ``dim -> hidden -> hidden -> out_dim``."""

    def __init__(self, dim: int, heads: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.relation = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0,
                                                   activation="gelu", batch_first=True,
                                                   norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.projector = mlp([dim, hidden_dim, hidden_dim, out_dim])

    def group(self, x: Tensor, neighbours: Tensor) -> Tensor:
        """The local-group feature ``[B, D]`` of ``x`` ``[B, D]`` with ``neighbours`` ``[B, n, D]``."""
        tokens = torch.cat([x[:, None], neighbours.to(x.dtype)], dim=1)
        return self.norm(self.relation(tokens)[:, 0])

    def forward(self, x: Tensor, neighbours: Tensor) -> Tensor:
        return F.normalize(self.projector(self.group(x, neighbours)), dim=-1)


def local_group_info_nce(preds: Sequence[Tensor], targets: Sequence[Tensor], queue: Tensor,
                         temperature: float = 0.2, n_global: int = 2) -> Tensor:
    """Mugs' crop-weighted InfoNCE: for every teacher target ``w`` and student prediction
    ``v != w`` (unit vectors ``[B, E]``), ``-log softmax`` of the positive ``p.t / tau`` against the
    queue entries ``p.q / tau``; the mean over the pairs with a global ``v`` (``v <
    n_global``) and the mean over those with a local one, averaged (the global mean alone without
    local crops)."""
    large, small = [], []
    q = queue.detach()
    for w, t in enumerate(targets):
        for v, p in enumerate(preds):
            if v == w:
                continue
            pos = (p * t.detach()).sum(-1, keepdim=True)
            logits = torch.cat([pos, p @ q.to(p.dtype).T], dim=1) / temperature
            term = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
            (large if v < n_global else small).append(term)
    big = torch.stack(large).mean()
    return 0.5 * (big + torch.stack(small).mean()) if small else big


class MugsLocalGroup(Objective):
    """Mugs' local-group supervision (see the module docstring) on the encoder's pooled features
    ``x_v`` ``[B, dim]`` (``Views.embeddings``; the first ``n_global`` views are the global crops)
    and the momentum teacher's (``Views.extras["teacher"]``, the ``ema`` teacher).

    The student's relation block, layer norm, projector and predictor belong to this objective;
    their teacher side (relation block, layer norm, projector) is its momentum copy, an
    :class:`sdk.momentum.EMATeacher` updated after every optimizer step (``after_optimizer_step``,
    cosine ``momentum`` -> ``final_momentum``). The two memories (student's and teacher's
    features of the first crop, ``memory_size`` rows) and the queue of targets (``queue_size``
    unit rows) start as random draws, as the authors', and are checkpointed buffers, written in
    training after the loss (oldest rows out). ``gather`` ("auto": under DDP): the memories and
    the queue receive every rank's rows."""

    requires: ClassVar[dict[str, Any]] = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = True

    def __init__(self, dim: Annotated[int, Ge(1)] = 384, heads: Annotated[int, Ge(1)] = 6,
                 top_n: Annotated[int, Ge(0)] = 8, out_dim: Annotated[int, Ge(1)] = 256,
                 hidden_dim: Annotated[int, Ge(1)] = 2048,
                 pred_hidden_dim: Annotated[int, Ge(1)] = 4096,
                 temperature: Annotated[float, Gt(0)] = 0.2,
                 memory_size: Annotated[int, Ge(1)] = 65536,
                 queue_size: Annotated[int, Ge(1)] = 65536,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.996,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 1.0,
                 n_global: Annotated[int, Ge(1)] = 2, gather: Gather = "auto"):
        super().__init__()
        if top_n > memory_size:
            raise ConfigError(f"mugs_local_group: top_n={top_n} neighbours cannot be drawn from a "
                              f"memory of memory_size={memory_size} rows", param="top_n")
        if dim % heads:
            raise ConfigError(f"mugs_local_group: dim={dim} must be a multiple of heads={heads}",
                              param="heads")
        self.dim, self.top_n, self.temperature, self.n_global = dim, top_n, temperature, n_global
        self.memory_size, self.queue_size, self.gather = memory_size, queue_size, gather
        self.student = LocalGroup(dim, heads, hidden_dim, out_dim)
        self.predictor = mlp([out_dim, pred_hidden_dim, out_dim])
        self.momentum_heads = EMATeacher(self.student, momentum=momentum, final_momentum=final_momentum)
        self.register_buffer("memory_student", torch.randn(memory_size, dim))
        self.register_buffer("memory_teacher", torch.randn(memory_size, dim))
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out_dim), dim=1))
        for name in ("memory_student", "memory_teacher", "queue"):
            self.register_buffer(f"{name}_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _push(self, name: str, new: Tensor, gathered: bool) -> None:
        """Write ``new`` ``[b, width]`` at the ring buffer's pointer, oldest out."""
        new = at_least_float32(new.detach()).float()
        if gathered:
            new = gather_no_grad(new)
        rows, ptr = getattr(self, name), getattr(self, f"{name}_ptr")
        size = rows.shape[0]
        new = new[-size:]
        slots = (ptr + torch.arange(new.shape[0], device=new.device)) % size
        rows.index_copy_(0, slots, new.to(rows.dtype))
        ptr.copy_((ptr + new.shape[0]) % size)

    def _groups(self, head: nn.Module, xs: Sequence[Tensor], memory: Tensor) -> list[Tensor]:
        memory = memory.to(xs[0].dtype)
        norms = torch.linalg.vector_norm(memory, dim=-1)
        return [head(x, memory[top_neighbours(x, memory, self.top_n, norms)]) for x in xs]

    def forward(self, views: Views, batch: Batch) -> Loss:
        if views.n_views < max(2, self.n_global):
            raise RequirementError(f"{OWNER} needs at least {max(2, self.n_global)} views "
                                   f"(n_global={self.n_global} global crops), got {views.n_views}")
        teacher = check_teacher(OWNER, views, self.n_global)
        for v, z in enumerate(views.embeddings):
            if z.dim() != 2 or z.shape[1] != self.dim:
                raise ShapeError(f"{OWNER}: Views.embeddings[{v}] must be [B, {self.dim}] (dim), got "
                                 f"{list(z.shape)}")
        dtype = self.predictor[0].weight.dtype
        xs = [z.to(dtype) for z in views.embeddings]
        ts = [t.detach().to(dtype) for t in teacher]
        queue = self.queue.clone()  # saved for the backward pass; the push below writes the buffer
        preds = [F.normalize(self.predictor(g), dim=-1)
                 for g in self._groups(self.student, xs, self.memory_student)]
        with torch.no_grad():
            targets = self._groups(self.momentum_heads.target, ts, self.memory_teacher)
        value = local_group_info_nce(preds, targets, queue, self.temperature, self.n_global)
        if self.training:
            gathered = resolve_gather(self.gather)
            for t in targets:
                self._push("queue", t, gathered)
            self._push("memory_student", xs[0], gathered)
            self._push("memory_teacher", ts[0], gathered)
        return Loss(value=value)

    def after_optimizer_step(self, state: Any) -> None:
        """The momentum update of the teacher-side relation block, norm and projector."""
        self.momentum_heads.update(student=self.student, step=state.step - 1,
                            max_steps=state.trainer.total_steps)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """``max(2, n_global)`` views of ``[B, dim]`` features and the teacher's on each."""
        n = max(2, self.n_global)
        z = tuple(torch.randn(batch_size, self.dim, generator=generator).requires_grad_()
                  for _ in range(n))
        t = tuple(torch.randn(batch_size, self.dim, generator=generator) for _ in range(n))
        return Views(embeddings=z, extras={keys.TEACHER: t}), Batch()


CARD = Card(
    name="mugs_local_group", kind="objective",
    title="Mugs: A Multi-Granular Self-Supervised Learning Framework",
    paper="arXiv:2203.14415",
    summary="Local-group supervision: each crop's feature is aggregated with its top-n "
            "neighbours from a memory by a transformer block; the student's local group of one "
            "crop predicts the momentum teacher's of another, against a queue of past targets.",
    formula="g(x) = LN(R([x; topn_M(x)])[0]); t = normalize(proj_t(g_t(x_t))); "
            "p = normalize(pred(normalize(proj_s(g_s(x_s))))); l = -log e^{p.t/tau} / "
            "(e^{p.t/tau} + sum_Q e^{p.q/tau}); L = (mean_{v global, v != w} l + mean_{v local} l) / 2",
    left_out="Mugs' instance supervision (InfoNCE with a queue: nt_xent with the queue teacher) "
             "and group supervision (DINO's loss: dino with the dino_head encoder) are existing "
             "plugins to add to this one (the paper weights the three 1 : 1 : 1). The features "
             "are the encoder's embeddings: the ViT's token mean that the authors use as query "
             "and memory entry (and the class token's path) is the recipe's encoder. Every first "
             "crop enters the student's memory (the authors store its weakly augmented ones "
             "only). The teacher-side heads are this objective's momentum copy "
             "(0.996 -> 1 cosine); the backbone's teacher is the ema teacher.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MugsLocalGroup, card=CARD)
