"""VSFormer: a transformer over value tokens (the raw numbers of each time step) and shape tokens
(patterns of the z-normalised series), with a class prior in the positional encoding and in the
attention scores.

Xi, Zuo, Alvarez, Zhang, Choi and Lin, "VSFormer: Value and Shape-Aware Transformer with
Prior-Enhanced Self-Attention for Multivariate Time Series Classification", 2024
(arXiv:2412.16515).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.masking import sincos_1d

BRANCHES = ("both", "value", "shape")
EPS = 1e-5
"""Added to standard deviations (z-normalisation, within-class spread)."""


def fisher_prior(x: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The class prior of each time step, ``[T]``, from training series ``x [N, T, C]`` and class
    ids ``[N]``: the Fisher score ``sum_k n_k (mu_k - mu)^2 / (sum_k sum_{i in k} (x_i - mu_k)^2
    + EPS)`` per step and channel, averaged over channels (between- over within-class
    scatter)."""
    x = x.double()
    onehot = F.one_hot(labels, num_classes).double()  # [N, K]
    n = onehot.sum(0)  # [K]
    mu = x.mean(0)  # [T, C]
    mu_k = torch.einsum("nk,ntc->ktc", onehot, x) / n.clamp_min(1)[:, None, None]
    between = (n[:, None, None] * (mu_k - mu) ** 2).sum(0)
    within = ((x - torch.einsum("nk,ktc->ntc", onehot, mu_k)) ** 2).sum(0)
    return (between / (within + EPS)).mean(1).float()


def znormalise(x: Tensor) -> Tensor:
    """Each channel of each series ``[B, T, C]`` to mean 0 and standard deviation 1 over time."""
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True, unbiased=False) + EPS)


def prior_attention(q: Tensor, k: Tensor, v: Tensor, prior: Tensor, gate: Tensor) -> Tensor:
    """Prior-enhanced attention ``softmax(q kᵀ / sqrt(d) + g_h p_j) v`` for ``q, k, v [B, H, L,
    d]``, the key tokens' prior ``p [L]`` and one gate ``g_h`` per head ``[H]``."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores + gate[:, None, None] * prior).softmax(-1) @ v


class _PriorBlock(nn.Module):
    """Pre-norm block: prior-enhanced multi-head self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.ones(heads))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: Tensor, prior: Tensor) -> Tensor:
        b, length, dim = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = prior_attention(q, k, v, prior.to(q.dtype), self.gate.to(q.dtype))
        h = h + self.out(a.transpose(1, 2).reshape(b, length, dim))
        return h + self.mlp(self.norm2(h))


class VSFormer(Encoder):
    """Series ``x [B, seq_len, in_features]`` (or flat ``[B, seq_len · in_features]``) become
    ``seq_len`` value tokens ``V x_t`` (the raw values of step ``t``) and ``L'`` shape tokens (a
    ``Conv1d`` of ``shape_kernel``, stride ``shape_stride``, over the series z-normalised per
    channel: where the series goes, not its level). Each token gets a sine-cosine position (its
    step, or its window's centre), a type embedding and the prior encoding ``w p + b`` of its
    class prior ``p`` (:func:`fisher_prior` of the training ``dataset``, scaled to a maximum of 1;
    a shape token takes its window's mean); ``depth`` blocks of prior-enhanced attention add
    ``g_h p_j`` to the scores of key ``j``; the output is the tokens' mean after a LayerNorm,
    ``[B, embed_dim]``. Without ``dataset`` the prior is 0 (no class information).
    ``branches="value"`` / ``"shape"`` keeps one kind of token (the ablations)."""

    def __init__(self, seq_len: Annotated[int, Ge(1)] = 16, in_features: Annotated[int, Ge(1)] = 4,
                 dataset: Annotated[Any, FromData("dataset")] = None,
                 labels: Annotated[Any, FromData("labels")] = None,
                 num_classes: Annotated[int | None, Ge(2), FromData("num_classes")] = None,
                 in_dim: Annotated[int | None, FromData("in_dim")] = None,
                 embed_dim: Annotated[int, Ge(2)] = 64, depth: Annotated[int, Ge(1)] = 2,
                 heads: Annotated[int, Ge(1)] = 4, shape_kernel: Annotated[int, Ge(1)] = 8,
                 shape_stride: Annotated[int, Ge(1)] = 4,
                 branches: Annotated[str, one_of(BRANCHES)] = "both",
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0,
                 out_dim: Annotated[int | None, Ge(1)] = None):
        super().__init__()
        if in_dim is not None and in_dim != seq_len * in_features:
            raise ConfigError(f"vsformer_encoder: in_dim={in_dim} is not seq_len x in_features = "
                              f"{seq_len * in_features}", param="in_dim")
        if branches != "value" and shape_kernel > seq_len:
            raise ConfigError(f"vsformer_encoder: shape_kernel={shape_kernel} is longer than "
                              f"seq_len={seq_len}", param="shape_kernel")
        if embed_dim % heads or embed_dim % 2:
            raise ConfigError(f"vsformer_encoder: embed_dim={embed_dim} must be even and divisible "
                              f"by heads={heads}", param="heads")
        self.seq_len, self.in_features, self.in_dim = seq_len, in_features, seq_len * in_features
        self.out_dim, self.branches = out_dim or embed_dim, branches
        self.shape_kernel, self.shape_stride = shape_kernel, shape_stride
        step_prior = self._prior(dataset, labels, num_classes)
        starts = torch.arange(0, seq_len - shape_kernel + 1, shape_stride) if branches != "value" \
            else torch.zeros(0, dtype=torch.long)
        windows = step_prior.unfold(0, shape_kernel, shape_stride).mean(1) if len(starts) \
            else torch.zeros(0)
        steps = torch.arange(seq_len) if branches != "shape" else torch.zeros(0, dtype=torch.long)
        prior = torch.cat([step_prior[steps], windows])
        self.register_buffer("step_prior", step_prior)
        self.register_buffer("prior", prior / prior.max() if prior.max() > 0 else prior)
        where = torch.cat([steps.double(), starts.double() + (shape_kernel - 1) / 2])
        kind = torch.cat([torch.zeros(len(steps), dtype=torch.long),
                          torch.ones(len(starts), dtype=torch.long)])
        self.register_buffer("positions", sincos_1d(embed_dim, where))
        self.register_buffer("kind", kind)
        self.value = nn.Linear(in_features, embed_dim) if branches != "shape" else None
        self.shape = (nn.Conv1d(in_features, embed_dim, shape_kernel, stride=shape_stride)
                      if branches != "value" else None)
        self.type_embed = nn.Embedding(2, embed_dim)
        self.prior_embed = nn.Linear(1, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_PriorBlock(embed_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        if out_dim is not None:
            self.head = nn.Linear(embed_dim, out_dim)

    def _prior(self, dataset: Any, labels: Any, num_classes: int | None) -> Tensor:
        if dataset is None:
            return torch.zeros(self.seq_len)
        if isinstance(dataset, Tensor):
            rows, ids = dataset, labels
        else:
            rows, ids = dataset[:][:2]
            ids = ids if labels is None else labels
        rows, ids = torch.as_tensor(rows), None if ids is None else torch.as_tensor(ids)
        if not rows.is_floating_point() or rows.shape[0] < 2 or rows[0].numel() != self.in_dim:
            raise ConfigError(f"vsformer_encoder: dataset must hold floating series [N, {self.seq_len}, "
                              f"{self.in_features}] (or flat), N >= 2, got {rows.dtype} "
                              f"{list(rows.shape)}", param="dataset")
        if ids is None or ids.shape != (rows.shape[0],) or ids.is_floating_point() or int(ids.min()) < 0:
            raise ConfigError(f"vsformer_encoder: labels must be class ids [{rows.shape[0]}], one per "
                              "series of the dataset", param="labels")
        classes = num_classes if num_classes is not None else int(ids.max()) + 1
        if int(ids.max()) >= classes:
            raise ConfigError(f"vsformer_encoder: a label {int(ids.max())} is out of range for "
                              f"num_classes={classes}", param="labels")
        return fisher_prior(rows.reshape(-1, self.seq_len, self.in_features).detach(), ids.long(), classes)

    def tokens(self, x: Tensor) -> Tensor:
        """The tokens before the blocks ``[B, L, embed_dim]``: value tokens, then shape tokens."""
        t, c = self.seq_len, self.in_features
        if not x.is_floating_point() or not (x.dim() == 3 and tuple(x.shape[1:]) == (t, c)
                                             or x.dim() == 2 and x.shape[1] == t * c):
            raise ShapeError(f"encoder 'vsformer_encoder': x must be floating series [B, {t}, {c}] "
                             f"or flat [B, {t * c}], got {x.dtype} {list(x.shape)}")
        dtype = self.norm.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise ShapeError(f"encoder 'vsformer_encoder': x is {x.dtype} but the parameters are "
                             f"{dtype} (cast one to the other, or run under torch.autocast)")
        x = x.reshape(x.shape[0], t, c)
        parts = []
        if self.value is not None:
            parts.append(self.value(x))
        if self.shape is not None:
            parts.append(self.shape(znormalise(x).transpose(1, 2)).transpose(1, 2))
        h = torch.cat(parts, dim=1)
        extra = self.positions + self.type_embed(self.kind) + self.prior_embed(self.prior[:, None])
        return self.drop(h + extra.to(h.dtype))

    def features(self, x: Tensor) -> Tensor:
        """The mean of the tokens after the blocks and a LayerNorm, ``[B, embed_dim]``."""
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h, self.prior)
        return self.norm(h).mean(1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        return z if self.head is None else self.head(z)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.randn(batch_size, self.seq_len, self.in_features, generator=generator)


CARD = Card(
    name="vsformer_encoder", kind="encoder",
    title="VSFormer: Value and Shape-Aware Transformer with Prior-Enhanced Self-Attention for "
          "Multivariate Time Series Classification",
    paper="arXiv:2412.16515",
    summary="Classify multivariate series whose classes may differ in raw values rather than in "
            "shape: value tokens (the numbers of each step) and shape tokens (patterns of the "
            "z-normalised series) share a transformer whose positional encoding and attention "
            "scores carry a class prior computed from the training labels.",
    formula="value tokens V x_t; shape tokens Conv1d_{k=8, s=4}(znorm(x)); p_t = mean_c "
            "sum_k n_k (mu_{k,t,c} - mu_{t,c})^2 / sum_k sum_{i in k} (x_{i,t,c} - mu_{k,t,c})^2 "
            "(window mean for a shape token; scaled to max 1); token += PE(pos) + E_type + "
            "(w p + b); attention softmax(q kᵀ/sqrt(d) + g_h p_j) v; z = mean LN(h) (with out_dim: W z)",
    left_out="Not the paper's exact encoding, which could not be checked against its text here: "
             "its shape tokens are class-wise motifs found with STOMP and its value tokens "
             "statistics of intervals, and its prior is its own class-specific score; here a "
             "learned strided convolution over the z-normalised series gives the shape tokens, "
             "the raw steps the value tokens, and a per-step Fisher score (from the training "
             "labels) the prior, entering the positional encoding linearly and the attention "
             "scores through one learned gate per head. The UEA-30 benchmark is not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(VSFormer, card=CARD)
