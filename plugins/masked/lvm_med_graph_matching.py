"""LVM-Med: self-supervision as second-order graph matching between two views of a batch. Each
view's embeddings are the nodes of a k-nearest-neighbour graph over the batch; after a
message-passing step, node affinities (cosines of the nodes) and edge affinities (cosines of
the edges' feature differences) define a quadratic assignment problem between the two graphs,
whose solution should be the identity (image ``i`` of view 1 is image ``i`` of view 2); the loss
is the Hamming distance of the solution to the identity.

Nguyen, Nguyen, Le, Nguyen, Nguyen et al., "LVM-Med: Learning Large-Scale Self-Supervised Vision
Models for Medical Imaging via Second-order Graph Matching", NeurIPS 2023 (arXiv:2306.11925).
The combinatorial solver is replaced here by graduated assignment (Gold and Rangarajan, 1996):
a Sinkhorn relaxation of the quadratic assignment, differentiable end to end.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

NAME = "lvm_med_graph_matching"


def knn_graph(z: Tensor, k: int) -> Tensor:
    """``[B, B]`` 0/1: ``A_ik = 1`` for the ``k`` nodes of largest cosine to ``i`` (``i`` itself
    excluded; the graph's topology takes no gradient)."""
    zn = F.normalize(z.detach(), dim=1)
    sim = (zn @ zn.T).fill_diagonal_(float("-inf"))
    top = sim.topk(k, dim=1).indices
    return torch.zeros_like(sim).scatter_(1, top, 1.0)


def message_passing(z: Tensor, adjacency: Tensor) -> Tensor:
    """``h_i = z^_i + (1/|N(i)|) sum_{i' in N(i)} z^_i'`` with ``z^`` the L2-normalised nodes."""
    zn = F.normalize(z, dim=1)
    return zn + adjacency @ zn / adjacency.sum(1, keepdim=True).clamp_min(1)


def edge_affinity(h1: Tensor, a1: Tensor, h2: Tensor, a2: Tensor, s: Tensor) -> Tensor:
    """``Q(S)_ij = sum_{i' in N1(i), j' in N2(j)} cos(h1_i - h1_i', h2_j - h2_j') S_i'j'`` ``[B, B]``:
    the gradient of the quadratic (edge) term of the assignment objective at ``S``, in
    ``O(B^3 D)`` without the ``B^2 x B^2`` affinity matrix."""
    e1 = F.normalize(h1[:, None] - h1[None], dim=-1) * a1[..., None]  # [B, B, D]: edge (i, i')
    e2 = F.normalize(h2[:, None] - h2[None], dim=-1) * a2[..., None]
    t = torch.einsum("jld,kl->jkd", e2, s)  # sum_l e2_jl S_kl
    return torch.einsum("ikd,jkd->ij", e1, t)


def sinkhorn(scores: Tensor, iterations: int) -> Tensor:
    """The doubly stochastic ``S ~ exp(scores)`` (rows, then columns, normalised ``iterations``
    times in the log domain; differentiable)."""
    log_s = scores
    for _ in range(iterations):
        log_s = log_s - torch.logsumexp(log_s, dim=1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=0, keepdim=True)
    return log_s.exp()


def graph_matching(z1: Tensor, z2: Tensor, *, k: int, temperature: float, edge_weight: float,
                   rounds: int, sinkhorn_iterations: int) -> Tensor:
    """The relaxed matching ``S [B, B]`` between the two views' graphs: ``S_0 =
    sinkhorn(C / t)`` with ``C_ij = cos(h1_i, h2_j)``, then ``rounds`` times ``S = sinkhorn((C +
    edge_weight * Q(S) / k^2) / t)`` (graduated assignment on the quadratic objective
    ``sum C_ij S_ij + (edge_weight / 2k^2) sum Q``)."""
    a1, a2 = knn_graph(z1, k), knn_graph(z2, k)
    h1, h2 = message_passing(z1, a1), message_passing(z2, a2)
    unary = F.normalize(h1, dim=1) @ F.normalize(h2, dim=1).T
    s = sinkhorn(unary / temperature, sinkhorn_iterations)
    for _ in range(rounds):
        pairwise = edge_affinity(h1, a1, h2, a2, s) / (k * k)
        s = sinkhorn((unary + edge_weight * pairwise) / temperature, sinkhorn_iterations)
    return s


def hamming_to_identity(s: Tensor) -> Tensor:
    """``[B]``: row ``i``'s Hamming distance to the identity, ``sum_j S_ij (1 - d_ij) + (1 -
    S_ii)``."""
    diag = s.diagonal()
    return s.sum(1) - 2 * diag + 1


class LVMMedGraphMatching(Objective):
    """Two views' embeddings ``[B, D]`` of the same ``B`` images. Loss per image:
    :func:`hamming_to_identity` of :func:`graph_matching` (``k`` nearest neighbours per node,
    at most ``B - 1``). ``gather``: under DDP the graphs are over every rank's images (the
    global batch), and this rank's rows of the loss are returned. A batch of one image has
    nothing to match: refused."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, k: Annotated[int, Ge(1)] = 5, temperature: Annotated[float, Gt(0)] = 0.05,
                 edge_weight: Annotated[float, Ge(0)] = 1.0, rounds: Annotated[int, Ge(0)] = 3,
                 sinkhorn_iterations: Annotated[int, Ge(1)] = 20, gather: Gather = "auto"):
        super().__init__()
        self.gather = gather
        self.k, self.temperature, self.edge_weight = k, temperature, edge_weight
        self.rounds, self.sinkhorn_iterations = rounds, sinkhorn_iterations

    def forward(self, views: Views, batch: Batch) -> Loss:
        z1, z2 = views.embeddings[:2]
        b, offset = z1.shape[0], 0
        if resolve_gather(self.gather):
            z1, z2, offset = gather_with_grad(z1.contiguous()), gather_with_grad(z2.contiguous()), rank() * b
        if views.n_views != 2 or z1.shape[0] < 2:
            raise ShapeError(f"objective {NAME!r}: needs exactly two views of at least 2 images "
                             f"(the graphs' nodes), got {views.n_views} views of "
                             f"{list(z1.shape)}")
        dtype = torch.promote_types(z1.dtype, torch.float32)
        s = graph_matching(z1.to(dtype), z2.to(dtype), k=min(self.k, z1.shape[0] - 1),
                           temperature=self.temperature, edge_weight=self.edge_weight,
                           rounds=self.rounds, sinkhorn_iterations=self.sinkhorn_iterations)
        per_sample = hamming_to_identity(s)[offset:offset + b]
        hit = s.argmax(1) == torch.arange(s.shape[0], device=s.device)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"matching_accuracy": hit.float().mean().detach()})


CARD = Card(
    name=NAME, kind="objective",
    title="LVM-Med: Learning Large-Scale Self-Supervised Vision Models for Medical Imaging via "
          "Second-order Graph Matching",
    paper="arXiv:2306.11925",
    summary="Two views of a batch as two kNN graphs over its images; a message-passing step, node "
            "and edge affinities, a relaxed second-order (quadratic assignment) matching between "
            "the graphs, and the Hamming distance of the matching to the identity.",
    formula="A: kNN (k=5, cosine); h_i = z^_i + mean_{N(i)} z^; C_ij = cos(h1_i, h2_j); "
            "Q(S)_ij = sum_{i'~i, j'~j} cos(h1_i - h1_i', h2_j - h2_j') S_i'j'; S_0 = "
            "sinkhorn(C/t), S = sinkhorn((C + w Q(S)/k^2)/t) x3; L_i = sum_j S_ij - 2 S_ii + 1",
    left_out="The paper solves the quadratic assignment exactly with a combinatorial solver (a "
             "Lagrange-decomposition graph-matching solver) and differentiates it as a black box "
             "(Vlastelica et al., gradient of the lambda-interpolated loss); that solver is not "
             "here: the matching is relaxed by graduated assignment (Sinkhorn over node + edge "
             "affinities, unrolled), so the temperature 0.05, the 3 rounds and 20 Sinkhorn "
             "iterations are this implementation's, not the paper's. The paper's learnable "
             "message-passing network and its prior image similarities (global and local "
             "features of pretrained networks) are not here: the message passing is a "
             "parameter-free neighbour mean. k = 5 is from a summary of the method, not checked "
             "against the paper. Nodes are the batch's images (the graph is over the batch, "
             "not over an image's patches).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LVMMedGraphMatching, card=CARD)
