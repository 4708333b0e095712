"""Uniformity and tolerance of L2-normalised embeddings given class labels.

Wang, Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021 (arXiv:2012.09740),
Sec. 5: the uniformity of Wang & Isola (its Eq. 9, ``t = 2``) and the tolerance (its Eq. 10),
the mean cosine similarity of samples of the same class. A small temperature makes embeddings
more uniform and less tolerant (the uniformity-tolerance dilemma).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import check_embeddings, uniformity

_NAME = "uniformity_tolerance"


def tolerance(z: Tensor, labels: Tensor) -> float:
    """``T = sum_{i != j, y_i = y_j} f_i^T f_j / #{i != j : y_i = y_j}`` with ``f = z / ||z||``:
    the mean cosine similarity over ordered pairs of distinct samples of one class, from the
    per-class sums ``S_c = sum_{y_i = c} f_i`` as ``(sum_c ||S_c||^2 - sum_i ||f_i||^2) /
    (sum_c n_c^2 - N)``; NaN when no class has two samples."""
    check_embeddings(_NAME, z, labels)
    f = F.normalize(z.detach().to(torch.float64), dim=1)
    onehot = F.one_hot(labels.long(), int(labels.max()) + 1 if labels.numel() else 1).to(f)
    sums = onehot.T @ f                                    # [C, D]
    counts = onehot.sum(0)
    pairs = (counts * counts).sum() - counts.sum()
    total = sums.pow(2).sum() - f.pow(2).sum()
    return float(total / pairs) if float(pairs) > 0 else math.nan


def _labelled(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments for the conformance kit: ``z [B, 8]`` around one mean per class and
    the labels ``i % 3``."""
    labels = torch.arange(batch_size) % 3
    return 3 * torch.eye(3, 8)[labels] + torch.randn(batch_size, 8, generator=generator), labels


class UniformityTolerance(Metric):
    """``update(z, labels)`` keeps the L2-normalised rows and their class ids (both measures
    need every pair); ``compute()`` gives ``uniformity`` (lower = more uniform) and
    ``tolerance`` (higher = same-class samples closer) over everything updated."""

    example_inputs = staticmethod(_labelled)

    def __init__(self, t: Annotated[float, Gt(0)] = 2.0, chunk_size: Annotated[int, Ge(1)] = 1024):
        self.t, self.chunk_size = t, chunk_size
        self.reset()

    def update(self, z: Tensor, labels: Tensor) -> None:
        check_embeddings(_NAME, z, labels)
        if not z.is_floating_point():
            raise ShapeError(f"{_NAME}: z must be floating embeddings, got dtype {z.dtype}")
        self._z.append(F.normalize(z.detach().to(torch.float64), dim=1))
        self._y.append(labels.detach().long().to(z.device))

    def compute(self) -> dict[str, float]:
        if sum(r.shape[0] for r in self._z) < 2:
            return {"uniformity": math.nan, "tolerance": math.nan}
        device = self._z[0].device
        z = torch.cat([r.to(device) for r in self._z])
        y = torch.cat([r.to(device) for r in self._y])
        return {"uniformity": uniformity(z, t=self.t, chunk_size=self.chunk_size),
                "tolerance": tolerance(z, y)}

    def reset(self) -> None:
        self._z: list[Tensor] = []
        self._y: list[Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"z": torch.cat(self._z), "labels": torch.cat(self._y)} if self._z else {}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "z" in state:
            self._z = [torch.as_tensor(state["z"]).clone()]
            self._y = [torch.as_tensor(state["labels"]).clone()]


CARD = Card(
    name=_NAME, kind="metric", title="Understanding the Behaviour of Contrastive Loss",
    paper="arXiv:2012.09740",
    summary="Uniformity (log mean Gaussian potential over pairs) and tolerance (mean cosine "
            "similarity of same-class pairs) of L2-normalised embeddings; update(z, labels). "
            "A lower contrastive temperature gives lower uniformity and lower tolerance.",
    formula="f = z/||z||; L_uniformity = log mean_{i<j} exp(-t ||f_i - f_j||^2), t = 2; "
            "T = mean_{i != j, y_i = y_j} f_i^T f_j",
    left_out="The paper writes T = E_{x,y}[f(x)^T f(y) I(l(x) = l(y))] and describes it as the "
             "mean similarity of same-class samples: this is the latter (the expectation over "
             "same-class pairs, self-pairs excluded), which equals the former divided by the "
             "fraction of same-class pairs. Rows are kept until compute (every pair is needed).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(UniformityTolerance, card=CARD)
