"""Retrieval of the nearest training rows as the in-context examples of a tabular transformer.

Ma, Thomas, Hosseinzadeh et al. (Layer 6), "TabDPT: Scaling Tabular Foundation Models on
Real Data", 2024 (arXiv:2410.18164); the released inference code (layer6ai-labs/TabDPT-inference)
fixes the details: standardised features, exact L2 neighbours, features normalised by the
context's statistics, labels embedded and added to the context rows, every row attending to the
context rows only.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder

RETRIEVALS = ("knn", "random")
PLACEHOLDER_ROWS = 64
"""Without ``dataset``: this many standard-normal rows (seed 0), labelled ``i % 2``, stand in as
the bank, for shape checks only."""
CLIP = 10.0
"""Context-normalised features are clipped at this many context standard deviations."""


def retrieve(queries: Tensor, bank: Tensor, k: int, *, exclude_exact: bool = False,
             random: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Indices ``[B, k]`` into ``bank [N, F]`` for each row of ``queries [B, F]``: the ``k``
    nearest by Euclidean distance, nearest first (``random``: ``k`` rows drawn uniformly without
    replacement instead). ``exclude_exact`` never returns a bank row equal to the query (a
    training row does not see its own label)."""
    dist = torch.cdist(queries, bank, compute_mode="donot_use_mm_for_euclid_dist")
    score = torch.rand(dist.shape, generator=generator, device=dist.device) if random else dist
    if exclude_exact:
        score = score.masked_fill(dist == 0, math.inf)
    return score.topk(k, dim=1, largest=False).indices


class _ContextBlock(nn.Module):
    """Pre-norm block in which every token attends to the first ``c`` (context) tokens only."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: Tensor, c: int) -> Tensor:
        n = self.norm1(h)
        h = h + self.attn(n, n[:, :c], n[:, :c], need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class RetrievalInContextTabular(Encoder):
    """Each row ``x`` is embedded by a transformer that reads, as its context, the ``c`` training
    rows nearest to it (``c = min(context_size, N)``; in training mode a row never retrieves an
    identical bank row, so it cannot read its own label). Features are standardised by the
    bank's mean and standard deviation (the space of retrieval), then by the context's own
    (clipped at :data:`CLIP` deviations); tokens are ``LN(W x_i) + LN(E y_i)`` for context rows
    and ``LN(W x)`` for the query; ``depth`` blocks let every token attend to the context tokens
    only; :meth:`features` is the query token after a LayerNorm, ``[B, embed_dim]``, and the
    output is that, or with ``out_dim`` TabDPT's head on it (``Linear -> GELU -> Linear`` of
    ``4 · embed_dim`` hidden units: class logits for ``out_dim = num_classes``).

    ``dataset``: the training split (a ``TensorDataset`` of rows and class ids, or rows ``[N, F]``
    with ``labels``); without it see :data:`PLACEHOLDER_ROWS`. ``retrieval="random"`` draws the
    context uniformly instead (the ablation). Feed training rows without augmentation: a noisy
    copy of a row is no longer identical to it and would retrieve its own label."""

    def __init__(self, dataset: Annotated[Any, FromData("dataset")] = None,
                 labels: Annotated[Any, FromData("labels")] = None,
                 num_classes: Annotated[int | None, Ge(2), FromData("num_classes")] = None,
                 in_dim: Annotated[int | None, Ge(1), FromData("in_dim")] = None,
                 context_size: Annotated[int, Ge(2)] = 2048,
                 retrieval: Annotated[str, one_of(RETRIEVALS)] = "knn",
                 embed_dim: Annotated[int, Ge(2)] = 64, depth: Annotated[int, Ge(1)] = 2,
                 heads: Annotated[int, Ge(1)] = 4, out_dim: Annotated[int | None, Ge(1)] = None):
        super().__init__()
        rows, ids = self._bank(dataset, labels, in_dim)
        if embed_dim % heads:
            raise ConfigError(f"retrieval_in_context_tabular: embed_dim={embed_dim} is not divisible "
                              f"by heads={heads}", param="heads")
        classes = num_classes if num_classes is not None else int(ids.max()) + 1
        if int(ids.min()) < 0 or int(ids.max()) >= classes:
            raise ConfigError(f"retrieval_in_context_tabular: labels must be class ids in [0, "
                              f"{classes}), got [{int(ids.min())}, {int(ids.max())}]", param="labels")
        mean, std = rows.mean(0), rows.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("bank", (rows - mean) / std)
        self.register_buffer("bank_labels", ids)
        self.in_dim, self.out_dim, self.num_classes = rows.shape[1], out_dim or embed_dim, classes
        self.context_size, self.retrieval = context_size, retrieval
        self.x_embed, self.x_norm = nn.Linear(self.in_dim, embed_dim), nn.LayerNorm(embed_dim)
        self.y_embed, self.y_norm = nn.Embedding(classes, embed_dim), nn.LayerNorm(embed_dim)
        self.blocks = nn.ModuleList(_ContextBlock(embed_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        if out_dim is not None:
            self.head = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.GELU(),
                                      nn.Linear(4 * embed_dim, out_dim))

    @staticmethod
    def _bank(dataset: Any, labels: Any, in_dim: int | None) -> tuple[Tensor, Tensor]:
        if dataset is None:
            g = torch.Generator().manual_seed(0)
            rows = torch.randn(PLACEHOLDER_ROWS, in_dim or 64, generator=g)
            return rows, torch.arange(PLACEHOLDER_ROWS) % 2
        if isinstance(dataset, Tensor):
            rows, ids = dataset, labels
        else:
            rows, ids = dataset[:][:2]
            ids = ids if labels is None else labels
        rows = torch.as_tensor(rows)
        ids = torch.as_tensor(ids) if ids is not None else None
        if rows.dim() != 2 or rows.shape[0] < 3 or not rows.is_floating_point():
            raise ConfigError("retrieval_in_context_tabular: dataset must hold floating rows [N, F] "
                              f"with N >= 3, got {rows.dtype} {list(rows.shape)}", param="dataset")
        if ids is None or ids.shape != (rows.shape[0],) or ids.is_floating_point():
            shape = "None" if ids is None else f"{ids.dtype} {list(ids.shape)}"
            raise ConfigError(f"retrieval_in_context_tabular: labels must be integer class ids "
                              f"[{rows.shape[0]}], one per dataset row, got {shape}", param="labels")
        if in_dim is not None and in_dim != rows.shape[1]:
            raise ConfigError(f"retrieval_in_context_tabular: in_dim={in_dim} but the dataset has "
                              f"{rows.shape[1]} features", param="in_dim")
        return rows.detach().float().clone(), ids.detach().long().clone()

    def context(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(standardised x [B, F], context rows [B, c, F], context labels [B, c])``: the
        retrieved rows of the bank, nearest first for ``"knn"``."""
        if x.dim() != 2 or x.shape[1] != self.in_dim or not x.is_floating_point():
            raise ShapeError(f"encoder 'retrieval_in_context_tabular': x must be floating rows "
                             f"[B, {self.in_dim}], got {x.dtype} {list(x.shape)}")
        dtype = self.x_embed.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ShapeError(f"encoder 'retrieval_in_context_tabular': x is {x.dtype} but the "
                             f"parameters are {dtype} (cast one to the other, or run under autocast)")
        xs = (x - self.mean) / self.std
        n = self.bank.shape[0] - (1 if self.training else 0)
        idx = retrieve(xs.detach(), self.bank.to(xs.dtype), min(self.context_size, n),
                       exclude_exact=self.training, random=self.retrieval == "random")
        return xs, self.bank[idx].to(xs.dtype), self.bank_labels[idx]

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return z if self.head is None else self.head(z)

    def features(self, x: Tensor) -> Tensor:
        """The query token after the blocks and a LayerNorm, ``[B, embed_dim]``."""
        xs, ctx, ctx_y = self.context(x)
        rows = torch.cat([ctx, xs[:, None]], dim=1)
        mu, sd = ctx.mean(1, keepdim=True), ctx.std(1, keepdim=True) + 1e-6
        rows = ((rows - mu) / sd).clamp(-CLIP, CLIP)
        c = ctx.shape[1]
        h = self.x_norm(self.x_embed(rows))
        h = torch.cat([h[:, :c] + self.y_norm(self.y_embed(ctx_y)), h[:, c:]], dim=1)
        for block in self.blocks:
            h = block(h, c)
        return self.norm(h[:, -1])


CARD = Card(
    name="retrieval_in_context_tabular", kind="encoder",
    title="TabDPT: Scaling Tabular Foundation Models (retrieval of in-context rows)",
    paper="arXiv:2410.18164",
    summary="Embed each table row with a transformer that reads the row's nearest training rows "
            "and their labels as in-context examples, so the context stays small and local however "
            "large the training set is.",
    formula="x̃ = (x - mean_bank) / std_bank; C(x) = the c = min(context_size, N) nearest bank rows "
            "(exact L2; a training row excludes itself); rows normalised by C's mean and std "
            "(clipped at ±10); tokens t_i = LN(W x_i) + LN(E y_i) (context), t = LN(W x) (query); "
            "blocks h += MHA(LN h, LN h_C, LN h_C), h += MLP(LN h); z = LN(h_query) "
            "(with out_dim: W_2 GELU(W_1 z)); context_size = 2048",
    left_out="The pretrained TabDPT model (trained on real tables with retrieval-based "
             "self-supervision), its ensembling over feature and class permutations, regression "
             "bins, PCA of over-wide tables and missing-value handling are not here: this is the "
             "retrieval and the in-context reader, trained per dataset with a head of the user's "
             "choice. Deviations from the released code: labels are embedded per class "
             "(nn.Embedding) instead of as one scalar through a linear layer; outliers are "
             "clamped at ±10 context deviations without TabDPT's second pass; pre-norm "
             "LayerNorm blocks with a GELU MLP instead of its RMSNorm blocks with a gated "
             "branch and query/key norms.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RetrievalInContextTabular, card=CARD)
