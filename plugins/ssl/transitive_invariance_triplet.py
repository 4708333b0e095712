"""Transitive invariance: positives along a graph of intra- and inter-instance edges, ranked
by a triplet loss.

Wang, He & Gupta, "Transitive Invariance for Self-supervised Visual Representation Learning",
ICCV 2017 (arXiv:1708.02901).

A graph over the image patches has intra-instance edges (one object seen under another
viewpoint: the paper tracks it in video; here, the views of one sample) and inter-instance
edges (different objects of the same kind: the paper's nearest neighbours within clusters;
here ``Batch.extras["adjacency"]`` or the in-batch kNN graph). Two nodes are a positive pair when
a path of intra-instance edges and at most one inter-instance edge joins them: ``A - A'``
(intra), ``A - B`` (inter) and the transitive ``A' - B``, ``A - B'``, ``A' - B'``. Each positive
pair ``(a, p)`` is ranked against a negative ``n`` drawn at random among the nodes that are not
positives of ``a``: ``L = max(0, D(a, p) - D(a, n) + m)``, ``D = 1 - cos``, margin
``m = 0.5`` (the ranking loss of Wang & Gupta 2015 that the paper trains with).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.classification import upcast
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.graph import knn_graph
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.keys import ADJACENCY
from sdk.types import Batch, Loss, Views


def reflexive_closure(edges: Tensor) -> Tensor:
    """``R`` ``[N, N]`` bool: ``R_ij`` iff a path of ``edges`` (undirected, bool) joins ``i`` and
    ``j`` or ``i == j`` (by squaring ``I + E`` ``ceil(log2 N)`` times)."""
    n = edges.shape[0]
    r = edges | edges.T | torch.eye(n, dtype=torch.bool, device=edges.device)
    steps = max(1, (n - 1).bit_length())
    for _ in range(steps):
        r = (r.float() @ r.float()) > 0
    return r


def transitive_positives(intra: Tensor, inter: Tensor) -> Tensor:
    """Pairs joined by intra-instance edges and at most one inter-instance edge (both ``[N, N]``
    bool, undirected): ``R | R E R`` without the diagonal, ``R`` the reflexive closure of
    ``intra``, ``E = inter | inter^T``."""
    r = reflexive_closure(intra).float()
    e = (inter | inter.T).float()
    linked = (r > 0) | ((r @ e @ r) > 0)
    return linked & ~torch.eye(intra.shape[0], dtype=torch.bool, device=intra.device)


def triplet_ranking_loss(z: Tensor, positive: Tensor, negative_index: Tensor,
                         margin: float = 0.5) -> Tensor:
    """Mean over the positive pairs ``(a, p)`` of ``max(0, D(a, p) - D(a, n_ap) + margin)``, ``D =
    1 - cos``, ``n_ap = negative_index[a, p]`` (``[N, N]`` node ids); 0 without positive pairs."""
    zn = F.normalize(upcast(z), dim=-1)
    d = 1 - zn @ zn.T
    hinge = F.relu(d - d.gather(1, negative_index) + margin)
    return torch.where(positive, hinge, 0).sum() / positive.sum().clamp_min(1)


class TransitiveInvarianceTriplet(Objective):
    """The triplet ranking loss over the transitive positives of the ``V`` views' embeddings
    (rows of ``cat(views)``, view-major). Intra-instance edges join the views of each sample;
    inter-instance edges between samples come from ``Batch.extras["adjacency"]`` ``[B, B]``
    (nonzero = edge) when given, else from each sample's ``neighbors`` nearest others (cosine,
    first view, detached). A negative per positive pair is drawn from torch's global RNG among
    the anchor's non-positives (a pair whose anchor has none counts 0). ``gather`` ("auto":
    under DDP): the graph, the draws and the loss are over the global batch (an adjacency given
    per rank is then refused: no rank knows the edges across ranks)."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, margin: Annotated[float, Gt(0)] = 0.5, neighbors: Annotated[int, Ge(0)] = 1,
                 gather: Gather = "auto"):
        super().__init__()
        self.margin, self.neighbors, self.gather = margin, neighbors, gather

    def _inter(self, zs: list[Tensor], batch: Batch, gathered: bool) -> Tensor:
        b = zs[0].shape[0]
        adj = batch.extras.get(ADJACENCY)
        owner = f"objective {self.name!r}"
        if adj is not None:
            if gathered:
                raise ShapeError(f"{owner}: Batch.extras[{ADJACENCY!r}] holds one rank's graph, "
                                 "but the loss is gathered over ranks; pass gather=False")
            if not isinstance(adj, Tensor) or tuple(adj.shape) != (b, b):
                shape = list(adj.shape) if isinstance(adj, Tensor) else type(adj).__name__
                raise ShapeError(f"{owner}: Batch.extras[{ADJACENCY!r}] must be [{b}, {b}], got {shape}")
            return (adj.to_dense() if adj.is_sparse else adj) != 0
        x = F.normalize(zs[0].detach().float(), dim=-1)
        return knn_graph(x, self.neighbors) > 0

    def forward(self, views: Views, batch: Batch) -> Loss:
        zs = list(views.embeddings)
        gathered = resolve_gather(self.gather)
        if gathered:
            zs = [gather_with_grad(z) for z in zs]
        v, b = len(zs), zs[0].shape[0]
        ids = torch.arange(b, device=zs[0].device).repeat(v)
        intra = ids[:, None] == ids[None, :]
        inter = self._inter(zs, batch, gathered)[ids][:, ids]
        positive = transitive_positives(intra, inter)
        candidates = ~positive & ~torch.eye(v * b, dtype=torch.bool, device=positive.device)
        has_negative = candidates.any(dim=1, keepdim=True)
        weight = candidates.float() + (~has_negative).float()  # rows without one: any draw, unused
        negative_index = torch.multinomial(weight, v * b, replacement=True)
        positive = positive & has_negative
        value = triplet_ranking_loss(torch.cat(zs), positive, negative_index, self.margin)
        logs = {"positives_per_node": positive.float().sum(1).mean().detach()}
        return Loss(value=value, logs=logs)


CARD = Card(
    name="transitive_invariance_triplet", kind="objective",
    title="Transitive Invariance for Self-supervised Visual Representation Learning",
    paper="arXiv:1708.02901",
    summary="Positive pairs are nodes joined by intra-instance edges (views of one sample) and at "
            "most one inter-instance edge (a given adjacency or in-batch kNN), which makes the "
            "transitive pairs (A', B) positives; each is ranked above a random non-positive by "
            "a cosine triplet loss with margin 0.5.",
    formula="R = closure(intra), P = (R | R E R) \\ I; L = mean_{(a,p) in P} max(0, D(a,p) - "
            "D(a,n) + m), n ~ U(non-positives of a), D = 1 - cos, m = 0.5",
    left_out="Video tracking (the paper's intra-instance edges) and its clustering of a whole "
             "dataset into many small clusters (its inter-instance edges): the views of a sample and "
             "Batch.extras['adjacency'] or the in-batch kNN graph (neighbors=1) stand in for them. "
             "The paper's multi-task heads and its sampling of triplets over the dataset are not "
             "reproduced; negatives are drawn in the batch, one per positive pair.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(TransitiveInvarianceTriplet, card=CARD)
