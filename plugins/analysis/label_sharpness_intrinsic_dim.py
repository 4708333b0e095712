"""Label sharpness and intrinsic dimension of a dataset or of its learned representations.

Konz, Mazurowski, "The Effect of Intrinsic Dataset Properties on Generalization: Unraveling
Learning Differences Between Natural and Medical Images", ICLR 2024 (arXiv:2401.08865).
Label sharpness ``K_F`` (its Sec. 3.2) is the empirical Lipschitz constant of the labelling
function; the intrinsic dimension (its Sec. 3.1) is the MLE of Levina & Bickel with the
MacKay-Ghahramani averaging of inverses, ``k = 20``, as the authors compute it with the code
of Pope et al. (2021). The paper's scaling law is ``test loss ~ K_F N^{-1/d}``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import Tensor

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import check_embeddings, nan_if_any_nan

_NAME = "label_sharpness_intrinsic_dim"


def _check(x: Tensor, labels: Tensor | None) -> None:
    check_embeddings(_NAME, x, labels, "x")
    if not x.is_floating_point():
        raise ShapeError(f"{_NAME}: x must be floating [N, D], got dtype {x.dtype}")


def _row_chunks(x: Tensor, chunk_size: int):
    """``(start, distances [c, N])`` of each chunk of rows to every row (float64)."""
    for start in range(0, x.shape[0], chunk_size):
        yield start, torch.cdist(x[start:start + chunk_size], x)


def label_sharpness(x: Tensor, labels: Tensor, chunk_size: int = 1024) -> float:
    """``K_F = max_{j != k} [y_j != y_k] / ||x_j - x_k||_2`` (``|y_j - y_k|`` for binary labels);
    coincident rows of one class are skipped, of two classes give ``inf``; 0 for one class."""
    _check(x, labels)
    z = x.detach().to(torch.float64)
    y = labels.to(z.device)
    best = torch.zeros((), dtype=torch.float64, device=z.device)
    for start, d in _row_chunks(z, chunk_size):
        differ = (y[start:start + d.shape[0], None] != y[None, :]).to(d)
        best = torch.maximum(best, torch.where(differ > 0, differ / d, 0.0).max())
    return float(best + nan_if_any_nan(z))


def intrinsic_dim_mle(x: Tensor, k: int = 20, chunk_size: int = 1024) -> float:
    """``d = [1/N sum_i 1/(k-2) sum_{j<k} log(T_k(x_i) / T_j(x_i))]^{-1}``, ``T_j`` the distance
    to the ``j``-th nearest other row; ``k`` is capped at ``N - 1`` (NaN below 3)."""
    _check(x, None)
    z = x.detach().to(torch.float64)
    k = min(k, z.shape[0] - 1)
    if k < 3:
        return math.nan
    inv = []
    for start, d in _row_chunks(z, chunk_size):
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, rows + start] = math.inf                     # not one's own neighbour
        t = d.topk(k, dim=1, largest=False).values           # T_1 <= ... <= T_k
        inv.append(torch.log(t[:, -1:] / t[:, :-1]).sum(1) / (k - 2))
    return float(1.0 / torch.cat(inv).mean() + nan_if_any_nan(z))


def _labelled(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments for the conformance kit: ``x [B, 8]`` and the labels ``i % 2``."""
    labels = torch.arange(batch_size) % 2
    return 2 * torch.eye(2, 8)[labels] + torch.randn(batch_size, 8, generator=generator), labels


class LabelSharpnessIntrinsicDim(Metric):
    """``update(x, labels)`` keeps the rows (inputs flattened to ``[N, D]``, or representations)
    and their class ids; ``compute()`` gives ``label_sharpness`` and ``intrinsic_dim`` over
    everything updated (both need every pair of rows)."""

    example_inputs = staticmethod(_labelled)

    def __init__(self, k: Annotated[int, Ge(3)] = 20, chunk_size: Annotated[int, Ge(1)] = 1024):
        self.k, self.chunk_size = k, chunk_size
        self.reset()

    def update(self, x: Tensor, labels: Tensor) -> None:
        _check(x, labels)
        self._x.append(x.detach().to(torch.float64))
        self._y.append(labels.detach().long().to(x.device))

    def compute(self) -> dict[str, float]:
        if not self._x:
            return {"label_sharpness": math.nan, "intrinsic_dim": math.nan}
        device = self._x[0].device
        x = torch.cat([r.to(device) for r in self._x])
        y = torch.cat([r.to(device) for r in self._y])
        return {"label_sharpness": label_sharpness(x, y, self.chunk_size),
                "intrinsic_dim": intrinsic_dim_mle(x, self.k, self.chunk_size)}

    def reset(self) -> None:
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"x": torch.cat(self._x), "labels": torch.cat(self._y)} if self._x else {}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "x" in state:
            self._x = [torch.as_tensor(state["x"]).clone()]
            self._y = [torch.as_tensor(state["labels"]).clone()]


CARD = Card(
    name=_NAME, kind="metric",
    title="The Effect of Intrinsic Dataset Properties on Generalization: Unraveling Learning "
          "Differences Between Natural and Medical Images",
    paper="arXiv:2401.08865",
    summary="Label sharpness K_F (the largest label change per unit distance over pairs of rows) "
            "and the MLE intrinsic dimension of a dataset's inputs or of a layer's "
            "representations; update(x, labels). Higher K_F predicts steeper generalisation "
            "scaling with the intrinsic dimension and lower adversarial robustness.",
    formula="K_F = max_{j != k} [y_j != y_k] / ||x_j - x_k||_2; d = [1/N sum_i 1/(k-2) "
            "sum_{j=1}^{k-1} log(T_k(x_i) / T_j(x_i))]^{-1}, T_j = distance to the j-th nearest "
            "neighbour, k = 20",
    left_out="The paper estimates K_F on M = 1000 sampled rows (pass a subset); its binary "
             "|y_j - y_k| is generalised to [y_j != y_k] (the authors' code tests y_j == y_k in "
             "its multiclass branch, which measures the opposite); the TwoNN and GeoMLE "
             "estimators, the hooks extracting a layer's activations (pass them as x), and the "
             "radiology datasets and models are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LabelSharpnessIntrinsicDim, card=CARD)
