"""Proto-Triplet and ICNN losses: class separability of embeddings, for few-shot metric learning.

Mendez-Ruiz, Gonzalez-Zapata, Reyes-Amezcua, Flores-Araiza, Lopez-Tiro, Mendez-Vazquez &
Ochoa-Ruiz, "SuSana Distancia is all you need: Enforcing class separability in metric learning
via two novel distance-based loss functions for few-shot image classification" (arXiv:2305.09062).
Definitions and defaults (margin 0.5, k = 4 neighbours, distances ``sqrt(||a - b||^2 + 1e-6)``,
the combined loss the mean of the selected terms) follow the authors' code
(github.com/maumruiz/FewShot-KidneyStones, ``pro-fewshot/algorithms/icnn_loss.py``:
``proto_triplet_loss`` and ``modified_score``).

* **Proto-Triplet**: each sample against the class prototypes (means), its own as the
  positive and the nearest other one as the negative: ``max(d(x, c_y) - min_{k != y} d(x, c_k)
  + margin, 0)``, averaged.
* **ICNN**: ``-log score``, the score (in ``(0, 1]``) of the intra-class and inter-class
  nearest neighbours of each sample among its ``k + 1`` nearest: ``score = (lambda + gamma)
  / 2`` with ``lambda`` the mean of a same-class closeness (``1 -`` the same-class neighbours'
  distances relative to the nearest other-class neighbour) and an other-class remoteness (the
  other-class neighbours' distances relative to the largest of them), and ``gamma`` the share
  of same-class samples among the ``k`` nearest.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge

from sdk import classification as cls
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

NAME = "proto_triplet_icnn"
EPS = 1e-6
"""The authors' code's epsilon: inside the square root of distances and in every denominator."""
TERMS = ("triplet", "icnn")


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(||a_i - b_j||^2 + 1e-6)`` [N, M] (the code's ``nearest_neighbors`` distance)."""
    sq = (a.square().sum(-1, keepdim=True) - 2 * a @ b.T + b.square().sum(-1)).clamp_min(0)
    return (sq + EPS).sqrt()


def proto_triplet(x: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Per-sample ``max(d(x_i, c_{y_i}) - min_{k != y_i} d(x_i, c_k) + margin, 0)`` [N] with
    ``c_k`` the batch mean of class ``k`` (0 for a sample whose batch has no other class).
    Prototypes are found through the [N, N] same-class matrix (no host sync for the classes)."""
    same = labels[:, None] == labels[None, :]
    w = same.to(x.dtype)
    protos = (w @ x) / w.sum(-1, keepdim=True)  # row j: the prototype of sample j's class
    d = distances(x, protos)
    positive = d.diagonal()
    negative = d.masked_fill(same, float("inf")).min(-1).values
    return (positive - negative + margin).clamp_min(0)  # -inf without another class: 0


def icnn_score(x: torch.Tensor, labels: torch.Tensor, k: int = 4) -> torch.Tensor:
    """The ICNN score (the code's ``modified_score``) of embeddings ``x`` [N, D] with class ids
    ``labels`` [N]: a scalar in ``(0, 1]``, 1 when every sample's ``k + 1`` nearest neighbours
    share its class. ``k`` is reduced to ``N - 2`` on small batches (then ``gamma = 1``)."""
    n = x.shape[0]
    if n < 3:  # no sample has a neighbour besides one other: the score of a perfect batch
        return 1.0 + 0.0 * x.sum()
    kk = n - 2 if k + 2 >= n else k
    d = distances(x, x).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf"))
    dist, idx = d.topk(kk + 1, dim=-1, largest=False)  # the k + 1 nearest, self excluded
    sc = (labels[idx] == labels[:, None]).to(x.dtype)
    dc = 1 - sc
    nearest_dc = dist.masked_fill(dc == 0, float("inf")).min(-1, keepdim=True).values
    nd = dist[:, :kk] / (nearest_dc + EPS)  # 0 without an other-class neighbour
    nd = nd / nd.max(-1, keepdim=True).values.clamp_min(1)
    sc_k, dc_k = sc[:, :kk], dc[:, :kk]
    sc_counts, dc_counts = sc_k.sum(-1), dc_k.sum(-1)
    rows_sc, rows_dc = (sc_counts > 0).to(x.dtype).sum(), (dc_counts > 0).to(x.dtype).sum()
    same_term = 1 - ((nd * sc_k).sum(-1) / (sc_counts + EPS)).sum() / (rows_sc + EPS)
    dcd = dist[:, :kk] * dc_k
    dcd = dcd / (dcd.max() + EPS)
    offset = torch.where(dc_k.sum() == 0, -1.0, 0.0)  # no other-class neighbour anywhere: 1
    other_term = ((dcd.sum(-1) / (dc_counts + EPS)).sum() / (rows_dc + EPS) + offset).abs()
    lam = (same_term + other_term) / 2
    gamma = (sc_counts / kk).mean() if k + 2 < n else torch.ones((), dtype=x.dtype, device=x.device)
    return (lam + gamma) / 2


class ProtoTripletICNN(Objective):
    """Proto-Triplet and ICNN losses on ``Views.embeddings[0]`` [B, D] with class ids
    ``Batch.targets`` [B]: the mean of the selected ``terms``. Prototypes and neighbours are
    taken over the batch (the global batch with ``gather``); the value couples the batch, so
    there are no per-sample terms. Compose with ``cross_entropy`` for the paper's
    cross-entropy + ICNN training."""

    requires = {"views": 1, "targets": True}
    consumes = frozenset({Input.LABELS})
    batch_coupled = True

    def __init__(self, margin: Annotated[float, Ge(0)] = 0.5, k: Annotated[int, Ge(1)] = 4,
                 terms: tuple[str, ...] = TERMS, gather: Gather = "auto"):
        super().__init__()
        terms = tuple(terms)
        if not terms or len(set(terms)) != len(terms) or not set(terms) <= set(TERMS):
            raise ConfigError(f"{NAME}: terms must be distinct entries of {TERMS}, got {terms!r}",
                              param="terms")
        self.margin, self.k, self.terms, self.gather = margin, k, terms, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        x, y = views.embeddings[0], batch.targets
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ShapeError(f"{NAME}: Batch.targets must be class ids [{x.shape[0]}], got "
                             f"{list(y.shape)}")
        check_ids(NAME, "Batch.targets", y)
        x = cls.upcast(x)
        if resolve_gather(self.gather):
            x, y = gather_with_grad(x), gather_no_grad(y)
        parts, logs = [], {}
        if "triplet" in self.terms:
            parts.append(proto_triplet(x, y, self.margin).mean())
            logs["proto_triplet"] = parts[-1].detach()
        if "icnn" in self.terms:
            score = icnn_score(x, y, self.k)
            parts.append(-torch.log(score))
            logs["icnn_score"] = score.detach()
        return Loss(value=torch.stack(parts).mean(), logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        x = torch.randn(batch_size, 5, generator=generator).requires_grad_()
        return Views(embeddings=(x,)), Batch(targets=torch.arange(batch_size) % 3)


CARD = Card(
    name=NAME, kind="objective",
    title="SuSana Distancia is all you need: Enforcing class separability in metric learning "
          "via two novel distance-based loss functions for few-shot image classification",
    paper="arXiv:2305.09062",
    summary="Two distance-based losses on embeddings: Proto-Triplet (each sample closer to its "
            "class prototype than to the nearest other prototype by a margin) and ICNN "
            "(-log of a score of intra- and inter-class nearest neighbours).",
    formula="d(a, b) = sqrt(||a - b||^2 + 1e-6); c_k = mean of class k; L_PT = mean_i max(d(x_i, "
            "c_{y_i}) - min_{k != y_i} d(x_i, c_k) + m, 0); among the k+1 nearest neighbours of x_i: "
            "nd_ij = d_ij / d(x_i, nearest other class), rescaled by max(1, max_j nd_ij); lambda_s = "
            "1 - mean_i mean_{j same} nd_ij, lambda_d = mean_i mean_{j other} d_ij / max d_other "
            "(1 if no sample has an other-class neighbour), gamma = mean_i |same among k nearest| "
            "/ k; score = ((lambda_s + lambda_d)/2 + gamma)/2; L_ICNN = -log score; L = mean of "
            "the selected terms",
    left_out="The few-shot episodes (support / query split, the backbone and the prototypical "
             "classifier) are the data's and the model's part: prototypes and neighbours are "
             "taken over the whole batch, a sample included in its own class prototype (the "
             "code's queries are scored against support prototypes). The code's ICNN variants "
             "over support, query or both sets are one batch-level score here. The summed "
             "cross-entropy of the paper's best runs is the cross_entropy plugin, composed. "
             "Batches of fewer than 3 samples score 1 (no neighbours to compare).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ProtoTripletICNN, card=CARD)
