"""Alice's conditional anatomical semantic alignment (CASA): the student's patch tokens query, by
one shared cross-attention layer, both the student's own tokens and the momentum teacher's; the two
aligned token sets are matched by DINO's centred, sharpened cross-entropy per patch.

Jiang, Sun, Guo, Bai, Yan, Lu and Xu, "Anatomical Invariance Modeling and Semantic Alignment for
Self-supervised Learning in 3D Medical Image Analysis", ICCV 2023 (arXiv:2302.05615).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import Center, at_least_float32
from sdk.types import Batch, Loss, Views

OWNER = "objective 'semantic_alignment_views'"


class CrossAttentionLayer(nn.Module):
    """The authors' cross-attention layer: multi-head attention of queries ``q [B, Lq, D]`` over
    ``kv [B, Lk, D]`` (bias-free projections to ``heads x head_dim``, softmax of ``q k^T /
    sqrt(head_dim)``, dropout on the attention, an output projection, dropout), added to the
    query and LayerNorm-ed (eps 1e-6); then a ReLU MLP of width ``hidden_dim`` with dropout,
    added and LayerNorm-ed."""

    def __init__(self, dim: int, hidden_dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.w_q, self.w_k, self.w_v = (nn.Linear(dim, heads * head_dim, bias=False) for _ in range(3))
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        self.attn_drop, self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        b, lq, _ = q.shape
        h, d = self.heads, self.head_dim
        qh = self.w_q(q).view(b, lq, h, d).transpose(1, 2)
        kh = self.w_k(kv).view(b, kv.shape[1], h, d).transpose(1, 2)
        vh = self.w_v(kv).view(b, kv.shape[1], h, d).transpose(1, 2)
        attn = self.attn_drop(torch.softmax((qh / d ** 0.5) @ kh.transpose(2, 3), dim=-1))
        x = self.norm1(q + self.drop1(self.out((attn @ vh).transpose(1, 2).reshape(b, lq, h * d))))
        return self.norm2(x + self.drop2(self.fc2(F.relu(self.fc1(x)))))


def aligned_cross_entropy(student: Tensor, teacher: Tensor, student_temp: float,
                          teacher_temp: float) -> Tensor:
    """``[B, L]``: ``-sum_k softmax(teacher / teacher_temp)_k log softmax(student /
    student_temp)_k`` per token, the teacher's side detached (centre it first)."""
    p_t = torch.softmax(at_least_float32(teacher.detach()) / teacher_temp, dim=-1)
    log_s = torch.log_softmax(at_least_float32(student) / student_temp, dim=-1)
    return -(p_t.to(log_s.dtype) * log_s).sum(-1)


class SemanticAlignmentViews(Objective):
    """Each view's student tokens ``Views.extras[keys.FEATURES]`` (``[B, 1 + L, dim]`` with a
    class token first, as ``vit`` gives them, or ``[B, L, dim]``) and the teacher's patch tokens of
    the same views, ``Batch.extras[keys.VIEW_TOKENS]`` (``[B, L, dim]`` each, e.g. the momentum
    teacher's, from the dataset or a transform). With the student's patch tokens ``z`` as
    queries, :class:`CrossAttentionLayer` (one module for both) gives ``a_s = CA(z, z)`` and ``a_t =
    CA(z, t)``; the loss is :func:`aligned_cross_entropy` of ``a_s`` against the centred ``a_t``,
    averaged over the patches and the views. The centre (:class:`sdk.ssl.Center`, momentum
    ``center_momentum``) follows the mean of ``a_t`` over the global batch after every training
    forward; ``gather`` ("auto": under DDP) all-reduces it, as DINO does. The class tokens take
    no part in the loss (they enter as ``0 * sum``, so a non-finite one is not hidden)."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.VIEW_TOKENS)}
    batch_coupled = True

    def __init__(self, dim: Annotated[int, Ge(1)] = 64, heads: Annotated[int, Ge(1)] = 8,
                 head_dim: Annotated[int, Ge(1)] = 64, hidden_dim: Annotated[int, Ge(1)] = 2048,
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.1,
                 student_temp: Annotated[float, Gt(0)] = 0.1,
                 teacher_temp: Annotated[float, Gt(0)] = 0.01,
                 center_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.9,
                 gather: Gather = "auto"):
        super().__init__()
        self.dim, self.student_temp, self.teacher_temp, self.gather = dim, student_temp, teacher_temp, gather
        self.align = CrossAttentionLayer(dim, hidden_dim, heads, head_dim, dropout)
        self.center = Center(center_momentum, owner=OWNER)

    def _pairs(self, views: Views, batch: Batch) -> tuple[list[Tensor], list[Tensor], Tensor]:
        feats, targets = views.extras[keys.FEATURES], batch.extras[keys.VIEW_TOKENS]
        if not isinstance(feats, (tuple, list)) or not isinstance(targets, (tuple, list)) \
                or len(targets) < len(feats):
            raise ShapeError(f"{OWNER}: Views.extras['features'] and Batch.extras['view_tokens'] "
                             "must hold one token tensor per view (the student's, the teacher's)")
        students, teachers, unused = [], [], []
        for i, (z, t) in enumerate(zip(feats, targets)):
            if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point() \
                    or t.shape[2] != self.dim:
                shape = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"{OWNER}: Batch.extras['view_tokens'][{i}] must be floating teacher "
                                 f"tokens [B, L, dim={self.dim}], got {shape}")
            b, n = t.shape[:2]
            if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 3 \
                    or z.shape[0] != b or z.shape[2] != self.dim or z.shape[1] not in (n, n + 1):
                shape = f"{z.dtype} {list(z.shape)}" if isinstance(z, Tensor) else type(z).__name__
                raise ShapeError(f"{OWNER}: Views.extras['features'][{i}] must be floating student tokens "
                                 f"[{b}, {n}, {self.dim}] or [{b}, {n + 1}, {self.dim}] (class token "
                                 f"first), as the view's teacher tokens, got {shape}")
            unused.append(at_least_float32(z[:, : z.shape[1] - n]).sum((1, 2)))
            students.append(z[:, z.shape[1] - n:])
            teachers.append(t.detach())
        return students, teachers, 0 * sum(unused)

    def forward(self, views: Views, batch: Batch) -> Loss:
        students, teachers, unused = self._pairs(views, batch)
        dtype = self.align.w_q.weight.dtype
        autocast = torch.is_autocast_enabled(students[0].device.type)
        cast = (lambda x: x) if autocast else (lambda x: x.to(dtype))  # noqa: E731
        a_s = [self.align(cast(z), cast(z)) for z in students]
        with torch.no_grad():  # the target side: no gradient reaches the queries through it
            a_t = [self.align(cast(z), cast(t)) for z, t in zip(students, teachers)]
        self.center.check(self.dim)
        per_token = [aligned_cross_entropy(s, self.center(t), self.student_temp, self.teacher_temp)
                     for s, t in zip(a_s, a_t)]
        per_sample = torch.stack([p.mean(1) for p in per_token]).mean(0) + unused
        if self.training:
            self.center.update(torch.cat([t.reshape(-1, self.dim) for t in a_t]),
                               all_reduce=resolve_gather(self.gather))
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of 1 + 4 student tokens and the teacher's 4 patch tokens of each."""
        z = tuple(torch.randn(batch_size, 5, self.dim, generator=generator).requires_grad_()
                  for _ in range(2))
        t = tuple(torch.randn(batch_size, 4, self.dim, generator=generator) for _ in range(2))
        views = Views(embeddings=tuple(x[:, 0].detach() for x in z), extras={keys.FEATURES: z})
        return views, Batch(extras={keys.VIEW_TOKENS: t})


CARD = Card(
    name="semantic_alignment_views", kind="objective",
    title="Anatomical Invariance Modeling and Semantic Alignment for Self-supervised Learning in "
          "3D Medical Image Analysis (Alice)",
    paper="arXiv:2302.05615",
    summary="Conditional semantic alignment: the student's patch tokens attend, through one "
            "shared cross-attention layer, to the student's tokens and to the momentum "
            "teacher's; DINO's centred, sharpened cross-entropy matches the two aligned token "
            "sets patch by patch.",
    formula="a_s = CA(z, z), a_t = CA(z, t), CA(q, kv) = LN(x + MLP(x)), x = LN(q + W_o "
            "softmax(W_q q (W_k kv)^T / sqrt(d_h)) W_v kv); L = mean_views mean_l -sum_k "
            "softmax((a_t - c) / tau_t) log softmax(a_s / tau_s), c <- m c + (1 - m) mean(a_t); "
            "tau_s = 0.1, tau_t = 0.01, m = 0.9, 8 heads of 64, MLP width 2048, dropout 0.1",
    left_out="Alice's other terms are other objectives: the image-level DINO loss across the "
             "two views (dino) and the masked reconstruction (mae); the paper weights all three "
             "1. The anatomical-invariance views (a crop and the matching anatomy in another "
             "volume, found by a pretrained SAM anatomical-embedding model), the 3D volumes, the "
             "nnFormer backbone and its heads, and the teacher-temperature warm-up (0.008 -> "
             "0.01 over 30 epochs) are not here. The student's keys and values are its own "
             "tokens (the authors': the student decoder's patch outputs, with the masked "
             "encoder's as queries); the teacher's tokens come in Batch.extras['view_tokens']. "
             "The seed entry's 'region-pooled embeddings matched by cosine' is not the method.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SemanticAlignmentViews, card=CARD)
