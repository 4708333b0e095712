"""Unsupervised class separability from the 0-dimensional persistent homology of embeddings.

Ghalyan, Gourgoulias, Satsangi, Labonne, Moran, Sabelja, "An Unsupervised Method for Estimating
Class Separability of Datasets with Application to LLMs Fine-Tuning" (arXiv:2305.15016; later
versions "Estimating class separability of text embeddings with persistent homology", TMLR
2024). The H0 bars of the Vietoris-Rips filtration of a point cloud are born at 0 and die when
their component merges into another: their persistence times are exactly the edge lengths of
the Euclidean minimum spanning tree (single linkage). The paper normalises them by the largest
one (the times scale with the data's diameter) and reads "only a few large persistence times"
as clustered, separable embeddings; monitoring that summary over fine-tuning tells, without
labels, when training stops making the embeddings more separable.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, Metric
from sdk.metrics import check_embeddings

_NAME = "h0_persistence_separability"
_STAT = torch.float64


def _rows(z: Tensor, normalize: bool, who: str = _NAME) -> Tensor:
    check_embeddings(who, z)
    if not z.is_floating_point():
        raise ShapeError(f"{who}: z must be floating embeddings [N, D], got dtype {z.dtype}")
    z = z.detach().to(_STAT)
    return F.normalize(z, dim=1) if normalize else z


def h0_persistence(z: Tensor, normalize: bool = True) -> Tensor:
    """The finite H0 persistence times ``[N - 1]`` (float64, ascending) of the Vietoris-Rips
    filtration of the rows of ``z`` (L2-normalised first when ``normalize``): the edge lengths of
    the Euclidean minimum spanning tree, by Prim's algorithm on the ``[N, N]`` distance matrix
    (``O(N^2)`` memory and work, each of the ``N - 1`` steps one vectorised pass over a row).
    The one infinite bar (the last component) is left out."""
    x = _rows(z, normalize)
    n = x.shape[0]
    if n < 2:
        return x.new_zeros(0)
    d = torch.cdist(x, x)
    inf = torch.tensor(math.inf, dtype=_STAT, device=x.device)
    reached = torch.zeros(n, dtype=torch.bool, device=x.device)
    reached[0] = True
    best = torch.where(reached, inf, d[0])        # distance of each vertex to the tree
    edges = []
    for _ in range(n - 1):
        j = best.argmin().view(1)
        edges.append(best.index_select(0, j))
        reached.index_fill_(0, j, True)
        best = torch.where(reached, inf, torch.minimum(best, d.index_select(0, j)[0]))
    return torch.cat(edges).sort().values


def separability_score(persistence: Tensor) -> dict[str, Tensor]:
    """``p_hat = p / max p`` and ``S = 1 - mean(p_hat)`` (float64 scalars; NaN when every
    persistence is 0, i.e. all rows coincide, or there is none). ``S`` lies in ``[0, 1)`` and
    rises as the normalised persistences concentrate near 0 with a few large ones (clusters
    joined late), the paper's picture of separable classes."""
    p = persistence.to(_STAT)
    top = p.max() if p.numel() else p.new_tensor(math.nan)
    mean = (p / top).mean() if p.numel() else p.new_tensor(math.nan)
    return {"separability": 1 - mean, "mean_normalized_persistence": mean, "max_persistence": top}


def h0_separability(z: Tensor, normalize: bool = True) -> float:
    """``S = 1 - mean_i p_i / max_j p_j`` over the H0 persistence times of ``z``."""
    return float(separability_score(h0_persistence(z, normalize))["separability"])


def _clusters(batch_size: int, generator: torch.Generator) -> tuple[Tensor]:
    """``update`` arguments for the conformance kit: ``z [B, 6]`` around three directions."""
    centres = 4 * torch.eye(3, 6)[torch.arange(batch_size) % 3]
    return (centres + torch.randn(batch_size, 6, generator=generator),)


class H0PersistenceSeparability(Metric):
    """``update(z)`` keeps the (L2-normalised when ``normalize``) rows of unlabelled embeddings;
    ``compute()`` gives ``separability`` (``S``), ``mean_normalized_persistence`` and
    ``max_persistence`` of their H0 persistence over everything updated (the spanning tree
    needs every pair of rows)."""

    example_inputs = staticmethod(_clusters)

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize
        self.reset()

    def update(self, z: Tensor) -> None:
        rows = _rows(z, self.normalize)
        if self._z and rows.shape[1] != self._z[0].shape[1]:
            raise ShapeError(f"{_NAME}: z rows must stay of width {self._z[0].shape[1]}, got "
                             f"{list(z.shape)}")
        self._z.append(rows)

    def compute(self) -> dict[str, float]:
        if sum(r.shape[0] for r in self._z) < 2:
            return {"separability": math.nan, "mean_normalized_persistence": math.nan,
                    "max_persistence": math.nan}
        device = self._z[0].device
        z = torch.cat([r.to(device) for r in self._z])
        return {k: float(v) for k, v in separability_score(h0_persistence(z, normalize=False)).items()}

    def reset(self) -> None:
        self._z: list[Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"z": torch.cat(self._z)} if self._z else {}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "z" in state:
            self._z = [torch.as_tensor(state["z"]).clone()]


class H0SeparabilityStopping(Callback):
    """Label-free stopping on ``S``: the probe set is the first ``probe_size`` training inputs
    seen (``state.x`` at ``after_forward``; all of the first epoch's when there are fewer, no
    targets read). At the end of every ``every``-th epoch ``S`` of the model's outputs on it
    (eval mode, no grad) is appended to :attr:`history` as ``(epoch, S)``; when ``S`` has not
    exceeded the best so far for ``patience`` evaluations in a row, ``state.trainer.should_stop``
    is set. Probe set, history, best and the count are checkpointed."""

    def __init__(self, probe_size: Annotated[int, Ge(2)] = 512, every: Annotated[int, Ge(1)] = 1,
                 patience: Annotated[int, Ge(1)] = 3, normalize: bool = True) -> None:
        self.probe_size, self.every, self.patience, self.normalize = probe_size, every, patience, normalize
        self._x: list[Tensor] = []
        self._closed = False
        self.history: list[tuple[int, float]] = []
        self.best = -math.inf
        self.stale = 0

    def _seen(self) -> int:
        return sum(r.shape[0] for r in self._x)

    def after_forward(self, state: Any) -> None:
        if self._closed or self._seen() >= self.probe_size:
            return
        self._x.append(state.x[:self.probe_size - self._seen()].detach().clone())

    def on_epoch_end(self, state: Any) -> None:
        if not self._x:
            return
        self._closed = True
        if (state.epoch + 1) % self.every:
            return
        x = torch.cat(self._x)
        model = state.model
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                z = model(x)
        finally:
            model.train(training)
        score = h0_separability(z.reshape(z.shape[0], -1), self.normalize)
        self.history.append((state.epoch, score))
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1
        if self.stale >= self.patience and state.trainer is not None:
            state.trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": torch.tensor(self.history, dtype=_STAT).reshape(-1, 2),
                                 "closed": self._closed, "best": self.best, "stale": self.stale}
        if self._x:
            state["probe_x"] = torch.cat(self._x)
        return state

    def load_state_dict(self, state: Any) -> None:
        self._x = [torch.as_tensor(state["probe_x"]).clone()] if "probe_x" in state else []
        self._closed, self.best, self.stale = bool(state["closed"]), float(state["best"]), int(state["stale"])
        self.history = [(int(e), float(s)) for e, s in torch.as_tensor(state["history"]).tolist()]


_FORMULA = ("f_i = z_i / ||z_i||; p_1..p_{N-1} = edge lengths of the Euclidean minimum spanning "
            "tree of {f_i} (= the finite H0 persistence times of the Vietoris-Rips filtration, "
            "all born at 0); p_hat = p / max p; S = 1 - mean(p_hat)")

_LEFT_OUT = (
    "The paper's exact persistence-score S(p) could not be read here (only its abstract, "
    "Figure 1 and summaries were reachable, no code): what they state is that the persistence "
    "times are normalised by their maximum, that data with only a few large persistence times "
    "are more clustered, and that less separable embeddings have larger normalised persistence "
    "times on average. S = 1 - mean(p_hat) is that statement as a statistic (higher = more "
    "separable), not necessarily the paper's formula. The stopping rule (no improvement of S "
    "in `patience` = 3 evaluations) is the seed catalogue's, not checked against the paper. "
    "Not here: sentence-transformer / LLM fine-tuning, higher homology groups, the paper's "
    "comparisons with Thornton's index, FDR and classifier AUC. Rows are kept until compute.")

CARD = Card(
    name=_NAME, kind="metric",
    title="An Unsupervised Method for Estimating Class Separability of Datasets with Application "
          "to LLMs Fine-Tuning",
    paper="arXiv:2305.15016",
    summary="Label-free class separability of embeddings from their H0 persistent homology: "
            "the minimum spanning tree's edge lengths of the L2-normalised rows, normalised by "
            "the largest; update(z). Separable classes give many small and few large "
            "persistences, so S is high.",
    formula=_FORMULA, left_out=_LEFT_OUT,
)

CALLBACK_CARD = Card(
    name=_NAME, kind="callback",
    title="An Unsupervised Method for Estimating Class Separability of Datasets with Application "
          "to LLMs Fine-Tuning",
    paper="arXiv:2305.15016",
    summary="Evaluates the H0 separability S of the model's outputs on a fixed unlabelled probe "
            "set (the first probe_size training inputs) every `every` epochs and stops training "
            "when S has not improved for `patience` evaluations; no labels are read.",
    formula=_FORMULA + "; stop when S_t <= max_{s<t} S_s for `patience` evaluations in a row",
    left_out=_LEFT_OUT,
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(H0PersistenceSeparability, card=CARD)
    registry.add(H0SeparabilityStopping, card=CALLBACK_CARD)
