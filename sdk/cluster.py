"""Clustering helpers for plugins that refresh pseudo-labels over a whole dataset.

:func:`kmeans` is Lloyd's algorithm with k-means++ seeding, seeded and deterministic, on the
device of its input; :func:`spectral_clustering` clusters a graph's nodes from an affinity
matrix (normalised spectral clustering, Ng, Jordan and Weiss, the last step of self-expressive
subspace clustering); :func:`dataset_index` gives the ``Batch.index`` of every row that
``trainer.embed(loader)`` returns, so per-sample state keyed by ``Batch.index`` can be filled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdk.errors import ConfigError, ShapeError

_CHUNK = 4096


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances ``[N, K]`` computed in row chunks."""
    c_sq = c.pow(2).sum(1)
    out = [(xi.pow(2).sum(1, keepdim=True) - 2 * xi @ c.T + c_sq).clamp_min(0)
           for xi in x.split(_CHUNK)]
    return torch.cat(out)


def _plus_plus(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=g, device=x.device)
    centres = [x[first]]
    d2 = _sq_dist(x, centres[0]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = torch.where(total > 0, d2 / total.clamp_min(torch.finfo(d2.dtype).tiny),
                            torch.full_like(d2, 1.0 / n))
        nxt = torch.multinomial(probs, 1, generator=g)
        centres.append(x[nxt])
        d2 = torch.minimum(d2, _sq_dist(x, centres[-1]).squeeze(1))
    return torch.cat(centres)


def kmeans(x: Tensor, k: int, *, iters: int = 50, seed: int = 0, normalize: bool = False,
           tol: float = 1e-6, init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` [N, D] into ``k`` groups; returns ``(labels [N], centres [k, D])``.

    ``normalize=True`` L2-normalises rows first (spherical data such as contrastive
    embeddings). Seeds with k-means++ (generator seeded with ``seed``) unless ``init`` [k, D]
    gives the starting centres (e.g. last epoch's, to warm-start a refresh). An empty cluster
    is re-seeded with the point farthest from its centre. Stops after ``iters`` Lloyd steps or
    when the centres move less than ``tol`` (relative).
    """
    if x.dim() != 2:
        raise ShapeError(f"kmeans: expected x of shape [N, D], got {list(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ConfigError(f"kmeans: k must be in [1, N={x.shape[0]}], got {k}", param="k")
    x = x.detach().float()
    if normalize:
        x = F.normalize(x, dim=1)
    if init is None:
        centres = _plus_plus(x, k, torch.Generator(device=x.device).manual_seed(seed))
    elif tuple(init.shape) != (k, x.shape[1]):
        raise ShapeError(f"kmeans: init must have shape [k={k}, D={x.shape[1]}], got {list(init.shape)}")
    else:
        centres = init.detach().to(x.device, torch.float32).clone()
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(iters):
        d2 = _sq_dist(x, centres)
        labels = d2.argmin(1)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            far = d2.gather(1, labels[:, None]).squeeze(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = (new - centres).pow(2).sum() / centres.pow(2).sum().clamp_min(1e-12)
        centres = new
        if float(shift) < tol:
            break
    labels = _sq_dist(x, centres).argmin(1)
    return labels, centres


def spectral_clustering(affinity: Tensor, k: int, *, seed: int = 0) -> Tensor:
    """Labels ``[N]`` of the nodes of a symmetric non-negative ``affinity [N, N]``: the ``k``
    leading eigenvectors of ``D^-1/2 A D^-1/2``, rows L2-normalised, then :func:`kmeans` (Ng,
    Jordan and Weiss, NeurIPS 2001). In float64; nodes without edges get degree 1."""
    if affinity.dim() != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ShapeError(f"spectral_clustering: affinity must be square [N, N], got "
                         f"{list(affinity.shape)}")
    if not 1 <= k <= affinity.shape[0]:
        raise ConfigError(f"spectral_clustering: k must be in [1, N={affinity.shape[0]}], got {k}",
                          param="k")
    a = affinity.detach().double()
    inv_sqrt = a.sum(1).clamp_min(1e-12).rsqrt()
    _, vectors = torch.linalg.eigh(inv_sqrt[:, None] * a * inv_sqrt[None])
    return kmeans(vectors[:, -k:], k, seed=seed, normalize=True)[0]


def dataset_index(dataset: Any) -> Tensor:
    """``Batch.index`` of each item of ``dataset`` in order: its ``index`` tensor when it has
    one (:class:`sdk.data.IndexedDataset`), else ``0..len-1``."""
    index = getattr(dataset, "index", None)
    if isinstance(index, Tensor):
        return index.long()
    return torch.arange(len(dataset))
