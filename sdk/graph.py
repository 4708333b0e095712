"""Graph clustering machinery: kNN graphs, normalised adjacency powers, DEC soft assignments, and
the shared body of the graph clustering objectives (SCGC's ``neighbor_contrastive_clustering``
and PamC's ``pamc_meta_node_contrastive``).

Kulatilleke, Portmann & Chandra, "SCGC: Self-Supervised Contrastive Graph Clustering",
arXiv:2204.12656; Xie, Girshick & Farhadi, "Unsupervised Deep Embedding for Clustering
Analysis" (DEC), ICML 2016.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdk import contrastive
from sdk.cluster import kmeans
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.events import State
from sdk.interfaces import Objective
from sdk.keys import ADJACENCY, FEATURES
from sdk.types import Batch, Loss, Views

# graph ------------------------------------------------------------------------------------


def knn_graph(x: Tensor, k: int) -> Tensor:
    """Dense 0/1 adjacency [N, N]: an edge from each row to its ``k`` nearest other rows
    (Euclidean, which orders neighbours as SDCN's heat kernel does)."""
    n = x.shape[0]
    k = min(k, n - 1)
    adj = torch.zeros(n, n, device=x.device)
    if k < 1:
        return adj
    d = torch.cdist(x.detach().float(), x.detach().float())
    d = d.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("inf"))
    return adj.scatter_(1, d.topk(k, dim=1, largest=False).indices, 1.0)


def normalized_adjacency(adj: Tensor) -> Tensor:
    """SDCN/SCGC graph: symmetrise, add self-loops, row-normalise: ``D^-1 (max(A, A^T) + I)``."""
    a = adj.to_dense() if adj.is_sparse else adj
    a = torch.maximum(a, a.T) + torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    return a / a.sum(dim=1, keepdim=True)


def graph_power(adj: Tensor, order: int, cumulative: bool = False) -> Tensor:
    """``A^r`` or, with ``cumulative`` (SCGC*'s influence augmentation), ``A + A^2 + ... + A^r``.

    Works on dense and sparse COO matrices; apply it to the whole graph, then slice batches.
    """
    if order < 1:
        raise ValueError(f"graph_power: order must be >= 1, got {order}")
    mm = torch.sparse.mm if adj.is_sparse else torch.mm
    power, total = adj, adj
    for _ in range(order - 1):
        power = mm(power, adj)
        total = total + power if cumulative else power
    return total.coalesce() if total.is_sparse else total


def subgraph(adj: Tensor, index: Tensor) -> Tensor:
    """Rows and columns ``index`` of a (dense or sparse) whole-dataset adjacency: a batch's
    ``Batch.extras["adjacency"]``."""
    return adj.index_select(0, index).index_select(1, index)


def batch_adjacency(views: Views, batch: Batch, *, knn: int, order: int, cumulative: bool) -> Tensor:
    """``Batch.extras["adjacency"]`` [B, B] (dense or sparse, used as given) or, when absent, the
    in-batch kNN graph of ``Views.extras["features"][0]`` (else the detached first view),
    normalised and raised to ``order``."""
    b = views.batch_size
    adj = batch.extras.get(ADJACENCY)
    if adj is not None:
        if not isinstance(adj, Tensor) or tuple(adj.shape) != (b, b):
            shape = list(adj.shape) if isinstance(adj, Tensor) else type(adj).__name__
            raise ShapeError(f"Batch.extras['adjacency']: expected shape [{b}, {b}], got {shape}")
        return adj
    features = views.extras.get(FEATURES)
    x = features[0] if features is not None else views.embeddings[0]
    return graph_power(normalized_adjacency(knn_graph(x, knn)), order, cumulative)


# DEC soft assignments ----------------------------------------------------------------------


def soft_assign(z: Tensor, centers: Tensor, dof: float = 1.0) -> Tensor:
    """Student-t kernel (DEC): ``q_ik ~ (1 + |z_i - mu_k|^2 / v)^(-(v+1)/2)``, rows sum to 1."""
    d2 = torch.cdist(z.float(), centers.float()).pow(2)
    return F.softmax(-(dof + 1) / 2 * torch.log1p(d2 / dof), dim=1)


def target_distribution(q: Tensor) -> Tensor:
    """DEC target ``p_ik ~ q_ik^2 / f_k`` with ``f_k = sum_i q_ik``, rows normalised."""
    w = q.pow(2) / q.sum(dim=0)
    return w / w.sum(dim=1, keepdim=True)


def dec_kl(q: Tensor) -> Tensor:
    """Per-sample ``KL(P || Q)`` [B] with the target ``P`` computed from ``q`` (no gradient)."""
    p = target_distribution(q.detach())
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(dim=1)


class DECClustering(nn.Module):
    """Learnable cluster centres ``mu`` [K, D] (created on first use when ``embedding_dim`` is
    None) initialised by k-means, with Student-t soft assignments."""

    def __init__(self, n_clusters: int, dof: float, embedding_dim: int | None):
        super().__init__()
        self.n_clusters, self.dof = n_clusters, dof
        self.centers = (nn.Parameter(torch.randn(n_clusters, embedding_dim) / embedding_dim ** 0.5)
                        if embedding_dim else nn.UninitializedParameter())
        self.register_buffer("initialised", torch.tensor(False))

    def _materialise(self, z: Tensor) -> None:
        if isinstance(self.centers, nn.UninitializedParameter):
            self.centers.materialize((self.n_clusters, z.shape[1]), device=z.device)
            z = z.detach().float()
            if z.shape[0] >= self.n_clusters:
                init = kmeans(z, self.n_clusters)[1]
            else:
                init = z.mean(0) + z.std(0, unbiased=False) * torch.randn(
                    self.n_clusters, z.shape[1], device=z.device)
            with torch.no_grad():
                self.centers.copy_(init)

    def forward(self, z: Tensor) -> Tensor:
        self._materialise(z)
        return soft_assign(z, self.centers, self.dof)

    @torch.no_grad()
    def refresh(self, embeddings: Tensor) -> None:
        """Centres <- k-means centroids of the whole dataset's embeddings (DEC/SDCN init)."""
        self._materialise(embeddings)
        self.centers.copy_(kmeans(embeddings, self.n_clusters)[1])
        self.initialised.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        key = prefix + "centers"
        if isinstance(self.centers, nn.UninitializedParameter) and key in state_dict:
            self.centers.materialize(state_dict[key].shape, device=state_dict[key].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GraphClusteringObjective(Objective):
    """Shared body of SCGC and PamC: ``alpha * contrast + beta * KL(P || Q)`` per view, with
    graph positives from :func:`batch_adjacency` and DEC soft labels ``Q``.

    ``gather`` ("auto": under DDP) gathers every rank's views when the graph is the in-batch kNN
    graph, and each rank computes the loss of the global batch, as one process would
    (``per_sample`` keeps this rank's nodes). A batch with ``Batch.extras["adjacency"]`` is a
    subgraph whose edges to other ranks' nodes no rank knows: it stays on its rank."""

    requires = {"views": 1}
    batch_coupled = True

    def __init__(self, *, n_clusters: int, alpha: float, beta: float, tau: float, order: int,
                 cumulative: bool, knn: int, dof: float, embedding_dim: int | None,
                 gather: Gather = "auto"):
        super().__init__()
        self.alpha, self.beta, self.tau = alpha, beta, tau
        self.order, self.cumulative, self.knn = order, cumulative, knn
        self.gather = gather
        self.clustering = DECClustering(n_clusters, dof, embedding_dim)

    @abc.abstractmethod
    def contrast(self, z: Tensor, adjacency: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """Per-node contrastive loss [B] and its scalar mean for one view."""

    def forward(self, views: Views, batch: Batch) -> Loss:
        b = views.batch_size
        gathered = "adjacency" not in batch.extras and resolve_gather(self.gather)
        if gathered:
            features = views.extras.get("features")
            views = Views(embeddings=tuple(gather_with_grad(z) for z in views.embeddings),
                          extras={} if features is None else
                          {"features": tuple(gather_no_grad(f.detach()) for f in features)})
        adjacency = batch_adjacency(views, batch, knn=self.knn, order=self.order,
                                    cumulative=self.cumulative)
        values, per_sample, kls, cons = [], [], [], []
        for z in views.embeddings:
            q = self.clustering(z)
            per_node, con = self.contrast(z, adjacency, q)
            kl = dec_kl(q)
            values.append(self.alpha * con + self.beta * kl.mean())
            per_sample.append(self.alpha * per_node + self.beta * kl)
            kls.append(kl.mean())
            cons.append(con)
        per_sample = torch.stack(per_sample).mean(0)
        if gathered:
            per_sample = per_sample[rank() * b:(rank() + 1) * b]
        return Loss(value=torch.stack(values).mean(), per_sample=per_sample,
                    logs={"contrast": torch.stack(cons).mean().detach(),
                          "kl": torch.stack(kls).mean().detach()})

    def on_fit_start(self, state: State) -> None:
        """Initialise the cluster centres by k-means over the training set (once; kept on resume)."""
        if not bool(self.clustering.initialised):
            self.clustering.refresh(state.trainer.embed(state.trainer.train_loader))


def similarity_logits(z: Tensor, tau: float) -> Tensor:
    """``tau * cos(z_i, z_j)`` [N, N] with the diagonal cosine set to 0 (it then counts as e^0 = 1,
    as in the reference code)."""
    zn = F.normalize(z.float(), dim=-1)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return (tau * (zn @ zn.T)).masked_fill(eye, 0.0)


def neighbor_positive_term(z: Tensor, adjacency: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """``-log sum_j A_ij e^{tau cos(z_i, z_j)}`` per node (``cos_ii := 0``) and the mask of nodes
    with a neighbour (the others get 0).

    A sparse COO ``adjacency`` is evaluated edge by edge, in O(E D) time and memory.
    """
    if not adjacency.is_sparse:
        a = adjacency.float()
        valid = (a > 0).any(dim=1)
        return -contrastive.masked_logsumexp(similarity_logits(z, tau), a > 0, a), valid
    zn = F.normalize(z.float(), dim=-1)
    n = z.shape[0]
    a = adjacency.coalesce()
    (rows, cols), values = a.indices(), a.values().float()
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    cos = (zn[rows] * zn[cols]).sum(-1).masked_fill(rows == cols, 0.0)
    x = tau * cos + values.log()
    row_max = torch.full((n,), torch.finfo(x.dtype).min, device=z.device).scatter_reduce(
        0, rows, x.detach(), "amax", include_self=True)
    sums = torch.zeros(n, device=z.device).index_add_(0, rows, (x - row_max[rows]).exp())
    valid = sums > 0
    log_pos = torch.where(valid, sums.clamp_min(torch.finfo(x.dtype).tiny).log() + row_max,
                          torch.zeros_like(sums))
    return -log_pos, valid
