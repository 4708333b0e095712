"""Distill-VQ: a product quantiser trained to keep the dense embeddings' query-document ranking.

Xiao, Liu, Shao, Lian, Xie, Guo, Cao, Zhou, Sun, Wang and Kim, "Distill-VQ: Learning Retrieval
Oriented Vector Quantization By Distilling Knowledge from Dense Embeddings", SIGIR 2022,
arXiv:2204.00185 (authors' code: LibVQ).

Encoder ``distill_vq``: ``M`` codebooks of ``K = 2^bits`` codewords; the ``m``-th sub-vector
``h_m`` of the dense embedding ``h`` is assigned ``p_mk = softmax_k(-||h_m - c_mk||^2)`` and
replaced by its nearest codeword (forward), the gradient flowing through ``p`` (straight-through).
Objective ``distill_vq`` (ListNet distillation): with queries ``q``, dense documents ``d`` and
quantised ones ``d^``, ``L = -1/B sum_i sum_j softmax_j(<q_i, d_j>/t) log softmax_j(<q_i, d^_j>/t)``
over the documents of the (gathered) batch; no labels.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_with_grad, resolve_gather, world_size
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder, Objective
from sdk.types import Batch, Loss, Views


class ProductQuantizer(nn.Module):
    """Codebooks ``[M, K, D/M]`` (LibVQ's initialisation, ``U(-0.1, 0.1)``, or k-means with
    :meth:`fit_kmeans`); ``forward(h)`` is the straight-through quantisation of ``h [B, D]``."""

    def __init__(self, dim: int, subvectors: int, bits: int):
        super().__init__()
        self.dim, self.subvectors = dim, subvectors
        self.codebooks = nn.Parameter(torch.empty(subvectors, 2 ** bits, dim // subvectors)
                                      .uniform_(-0.1, 0.1))

    def _split(self, h: Tensor) -> Tensor:
        return h.reshape(h.shape[0], self.subvectors, -1)          # [B, M, D/M]

    def distances(self, h: Tensor) -> Tensor:
        """``||h_m - c_mk||^2`` as ``[B, M, K]``."""
        diff = self._split(h)[:, :, None, :] - self.codebooks.to(h.dtype)[None]
        return diff.pow(2).sum(-1)

    def codes(self, h: Tensor) -> Tensor:
        """The index of each sub-vector's nearest codeword, ``[B, M]``."""
        return self.distances(h).argmin(-1)

    def forward(self, h: Tensor) -> Tensor:
        soft = torch.softmax(-self.distances(h), dim=-1)             # [B, M, K]
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        assign = hard + soft - soft.detach()
        q = torch.einsum("bmk,mkd->bmd", assign, self.codebooks.to(assign.dtype))
        return q.reshape(h.shape[0], self.dim)

    @torch.no_grad()
    def fit_kmeans(self, h: Tensor, iters: int = 20, generator: torch.Generator | None = None) -> None:
        """Plain product quantisation: Lloyd's k-means on each sub-space of ``h [N, D]``
        (``N >= K``), started from ``K`` distinct rows; empty clusters keep their codeword."""
        x = self._split(h.to(self.codebooks.dtype))                 # [N, M, d]
        k = self.codebooks.shape[1]
        if x.shape[0] < k:
            raise ShapeError(f"encoder 'distill_vq': k-means needs at least {k} rows (2^bits), got "
                             f"{x.shape[0]}")
        start = torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)
        c = x[start].transpose(0, 1).clone()                         # [M, K, d]
        for _ in range(iters):
            a = (x.transpose(0, 1)[:, :, None] - c[:, None]).pow(2).sum(-1).argmin(-1)  # [M, N]
            onehot = F.one_hot(a, k).to(x.dtype)                     # [M, N, K]
            count = onehot.sum(1)[..., None]
            mean = torch.einsum("mnk,mnd->mkd", onehot, x.transpose(0, 1)) / count.clamp_min(1)
            c = torch.where(count > 0, mean, c)
        self.codebooks.copy_(c)


class DistillVQ(Encoder):
    """``forward(x) = head(features(x))``: ``features`` is the dense embedding (the ``backbone``'s
    output, or the flattened input ``[B, in_dim]`` without one) and ``head`` the
    :class:`ProductQuantizer` (``subvectors`` must divide the width). The engine publishes the
    dense embedding as ``Views.extras["features"]``, which the ``distill_vq`` objective needs."""

    def __init__(self, backbone: Encoder | None = None,
                 in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 subvectors: Annotated[int, Ge(1)] = 8, bits: Annotated[int, Interval(ge=1, le=12)] = 8):
        super().__init__()
        self.backbone = backbone
        self.in_dim = None if backbone is not None else in_dim
        self.out_dim = backbone.out_dim if backbone is not None else in_dim
        if self.out_dim % subvectors:
            raise ConfigError(f"distill_vq: subvectors={subvectors} must divide the embedding width "
                              f"{self.out_dim}", param="subvectors")
        self.head = ProductQuantizer(self.out_dim, subvectors, bits)

    def features(self, x: Tensor) -> Tensor:
        if self.backbone is not None:
            return self.backbone(x)
        if x.dim() < 2 or not x.is_floating_point() or x[0].numel() != self.out_dim:
            raise ShapeError(f"encoder 'distill_vq': x must be a floating batch [B, ...] of "
                             f"{self.out_dim} features, got {x.dtype} {list(x.shape)}")
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def listnet_distillation(queries: Tensor, dense: Tensor, quantized: Tensor,
                         temperature: float = 1.0) -> Tensor:
    """Per-query ListNet loss ``[Bq]``: ``-sum_j softmax(<q, d_j>/t) log softmax(<q, d^_j>/t)``,
    the teacher's scores detached; in float32."""
    q = queries.float()
    teacher = (q.detach() @ dense.detach().float().T / temperature).softmax(-1)
    student = (q @ quantized.float().T / temperature).log_softmax(-1)
    return -(teacher * student).sum(-1)


class DistillVQLoss(Objective):
    """The ListNet distillation above. Queries: the dense features of the first view
    (``Views.extras["features"][0]``); documents: the last view's dense features (teacher) and
    its embeddings, the quantised ones (student); with one view, the documents are the queries'
    own. Under DDP (``gather="auto"``) the documents of every rank are scored."""

    requires = {"views": 1, "extras": (keys.FEATURES,)}
    batch_coupled = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 1.0, gather: Gather = "auto"):
        super().__init__()
        self.temperature, self.gather = temperature, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        feats = views.extras[keys.FEATURES]
        if not isinstance(feats, (tuple, list)) or len(feats) != len(views.embeddings):
            raise ShapeError(f"objective 'distill_vq': Views.extras['features'] must hold one dense "
                             f"embedding per view ({len(views.embeddings)})")
        q, d, dq = feats[0], feats[-1], views.embeddings[-1]
        for name, t in (("features[0]", q), ("features[-1]", d)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != dq.shape:
                raise ShapeError(f"objective 'distill_vq': Views.extras[{name!r}] must be floating "
                                 f"{list(dq.shape)} like the quantised embeddings, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
        if resolve_gather(self.gather) and world_size() > 1:
            d, dq = gather_with_grad(d), gather_with_grad(dq)
        per_sample = listnet_distillation(q, d, dq, self.temperature)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        dense = torch.randn(batch_size, 8, generator=generator).requires_grad_()
        quantized = (dense.detach() + 0.1 * torch.randn(batch_size, 8, generator=generator)).requires_grad_()
        return Views(embeddings=(quantized,), extras={keys.FEATURES: (dense,)}), \
            Batch(index=torch.arange(batch_size))


ENCODER_CARD = Card(
    name="distill_vq", kind="encoder",
    title="Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling Knowledge "
          "from Dense Embeddings",
    paper="arXiv:2204.00185",
    summary="Product quantiser head on a dense embedding: nearest codeword per sub-vector forward, "
            "gradient through the soft assignment (straight-through); dense features published.",
    formula="p_mk = softmax_k(-||h_m - c_mk||^2); h^_m = c_{m, argmax p_m} (forward), "
            "grad through sum_k p_mk c_mk",
    left_out="IVF (coarse inverted-file centroids) and the OPQ rotation of LibVQ; the paper's "
             "faiss-based index export. Codebooks start U(-0.1, 0.1) as in LibVQ, or from k-means "
             "PQ with head.fit_kmeans (the paper starts from a trained faiss index). Defaults "
             "subvectors=8, bits=8 are generic, not the paper's 768-dim MS MARCO setting.",
)

OBJECTIVE_CARD = Card(
    name="distill_vq", kind="objective",
    title=ENCODER_CARD.title, paper="arXiv:2204.00185",
    summary="ListNet distillation: the softmax over quantised query-document scores is trained to "
            "match the softmax over the dense (teacher) scores, over in-batch documents, no labels.",
    formula="L = -1/B sum_i sum_j softmax_j(<q_i, d_j>/t) log softmax_j(<q_i, d^_j>/t); t = 1",
    left_out="The paper's candidate documents are in-batch plus retrieved hard negatives (top-K of "
             "the dense index); here the candidates are the (gathered) batch's documents. "
             "LibVQ adds 1e-6 inside the log of the student softmax; log_softmax is used here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DistillVQ, card=ENCODER_CARD)
    registry.add(DistillVQLoss, card=OBJECTIVE_CARD)
