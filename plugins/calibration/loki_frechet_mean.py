"""Loki: predict the Fréchet mean of the label metric space under the model's probabilities
instead of the argmax, so a model trained on K classes can predict any label of a larger,
metric label space (classes it never saw included).

Roberts, Li, Adila, Cromp, Huang, Zhao, Sala, "Geometry-Aware Adaptation for Pretrained
Models", NeurIPS 2023 (arXiv:2307.12226), equation (1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdk.calibration import FIT_DTYPE, check_fit_inputs, check_fitted
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "LokiFrechetMean", "frechet_mean"]


def frechet_mean(probs: Tensor, sq_distances: Tensor) -> Tensor:
    """``argmin_y sum_k p_k d(y, lambda_k)^2`` per row: ``probs [N, K]`` over the observed
    classes, ``sq_distances [|Y|, K]`` the squared distances of every label of ``Y`` to each
    observed class; returns label ids in ``[0, |Y|)`` ``[N]`` (ties: the lowest id)."""
    return (probs.to(sq_distances.dtype) @ sq_distances.T).argmin(dim=1)


class LokiFrechetMean(ResizableBuffers, Calibrator):
    """``predict(probs)``: the Fréchet mean ``argmin_{y in Y} sum_k p_k d(y, lambda_k)^2`` over
    the whole label space ``Y`` of the metric ``distances`` (``[|Y|, |Y|]``); the model's K
    classes sit at the labels ``observed`` of ``Y`` (default: the first K). Without
    ``distances`` the metric is the 0/1 metric on the K classes (then ``predict`` is the argmax).
    ``forward`` returns the probabilities unchanged: Loki changes the decision rule, not the
    scores, and learns nothing (``fit`` checks the data and records K)."""

    inputs = "probabilities"
    resizable_buffers = ("sq_distances",)

    def __init__(self, distances: list[list[float]] | None = None,
                 observed: list[int] | None = None):
        super().__init__()
        self.distances, self.observed = distances, observed
        d = None if distances is None else torch.as_tensor(distances, dtype=FIT_DTYPE)
        if d is not None:
            if d.dim() != 2 or d.shape[0] != d.shape[1] or d.shape[0] == 0:
                raise ConfigError(f"calibrator {self.name!r}: distances must be a square |Y| x |Y| "
                                  f"matrix, got shape {list(d.shape)}", param="distances")
            if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
                raise ConfigError(f"calibrator {self.name!r}: distances must be finite and "
                                  "non-negative", param="distances")
            if bool(d.diagonal().ne(0).any()) or not torch.allclose(d, d.T):
                raise ConfigError(f"calibrator {self.name!r}: distances must be a metric: zero "
                                  "diagonal, symmetric", param="distances")
        if observed is not None:
            ids = torch.as_tensor(observed, dtype=torch.long)
            size = None if d is None else d.shape[0]
            if ids.dim() != 1 or ids.numel() == 0 or ids.unique().numel() != ids.numel():
                raise ConfigError(f"calibrator {self.name!r}: observed must list distinct label "
                                  f"ids, got {observed}", param="observed")
            if size is None:
                raise ConfigError(f"calibrator {self.name!r}: observed needs distances (the "
                                  "metric of the label space they index)", param="observed")
            if int(ids.min()) < 0 or int(ids.max()) >= size:
                raise ConfigError(f"calibrator {self.name!r}: observed ids must lie in [0, {size}), "
                                  f"got {observed}", param="observed")
        self.register_buffer("num_classes", torch.zeros((), dtype=torch.long))
        self.register_buffer("sq_distances", torch.zeros(0, 0, dtype=FIT_DTYPE))
        self._metric = d

    def _sq_distances(self, k: int) -> Tensor:
        """``[|Y|, K]``: ``d(y, lambda_k)^2`` for ``k`` observed classes."""
        if self._metric is None:
            return 1 - torch.eye(k, dtype=FIT_DTYPE)
        ids = (torch.arange(k) if self.observed is None
               else torch.as_tensor(self.observed, dtype=torch.long))
        if ids.numel() != k or k > self._metric.shape[0]:
            raise ShapeError(f"calibrator {self.name!r}: the probabilities have {k} classes, but "
                             f"observed places {ids.numel()} classes in a label space of "
                             f"{self._metric.shape[0]}")
        return self._metric[:, ids].pow(2)

    def fit(self, probs: Tensor, labels: Tensor, **extra: Any) -> LokiFrechetMean:
        check_fit_inputs(self, probs, labels)
        self.sq_distances = self._sq_distances(probs.shape[1]).to(self.num_classes.device)
        self.num_classes.fill_(probs.shape[1])
        return self

    def forward(self, probs: Tensor) -> Tensor:
        check_fitted(self, probs, int(self.num_classes))
        return probs

    def predict(self, probs: Tensor) -> Tensor:
        """Label ids of ``Y`` ``[N]`` (``[0, |Y|)``, not only the K observed classes)."""
        probs = self(probs)
        return frechet_mean(probs, self.sq_distances.to(probs.device))


CARD = Card(
    name="loki_frechet_mean", kind="calibrator",
    title="Geometry-Aware Adaptation for Pretrained Models", paper="arXiv:2307.12226",
    summary="Replaces the argmax by the Fréchet mean of the label metric space weighted by the "
            "model's probabilities: a model of K classes predicts any label of the space, "
            "unseen ones included; training-free.",
    formula="y_hat(x) = argmin_{y in Y} sum_{k=1}^K P(lambda_k | x) d(y, lambda_k)^2, lambda_k "
            "the labels of Y the model's classes are (observed); a fixed linear map of the "
            "probabilities (P D^2_{:, observed}^T) followed by an argmin; the 0/1 metric on the K "
            "classes (distances None) gives the argmax",
    left_out="The paper's active next-class selection, its locus analysis, and deriving a metric "
             "from class embeddings (CLIP) are not implemented: the metric is given (distances). "
             "fit learns nothing (the method is training-free): it checks the probabilities and "
             "labels and records K; the ties of the argmin go to the lowest label id.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LokiFrechetMean, card=CARD)
