"""Isotonic regression: per class, the non-decreasing map of p_c closest in squared error to
the indicator [y = c] (pool adjacent violators), interpolated linearly, renormalised.

Zadrozny & Elkan, "Transforming classifier scores into accurate multiclass probability
estimates", KDD 2002 (one-vs-rest, renormalised); the fit and the interpolation follow
scikit-learn's ``IsotonicRegression(out_of_bounds="clip")`` exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdk.calibration import FIT_DTYPE, check_fit_inputs, check_fitted, one_vs_rest
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "IsotonicRegression", "isotonic_fit", "isotonic_predict"]


def _pava(weight: Tensor, total: Tensor) -> Tensor:
    """Pool adjacent violators on points sorted by x (weights, weighted sums of y): the fitted
    value of each point. Every adjacent pair of blocks whose means decrease is pooled at once
    (such blocks share a level set of the solution), until the means do not decrease."""
    block = torch.arange(weight.numel(), device=weight.device)
    while weight.numel() > 1:
        mean = total / weight
        violated = mean[:-1] > mean[1:]
        if not bool(violated.any()):
            break
        ids = torch.cat([violated.new_zeros(1), ~violated]).cumsum(0)
        block = ids[block]
        size = int(ids[-1]) + 1
        weight = weight.new_zeros(size).index_add(0, ids, weight)
        total = total.new_zeros(size).index_add(0, ids, total)
    return (total / weight)[block]


def isotonic_fit(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Thresholds ``(xs, ys)`` of the isotonic regression of ``y`` on ``x`` (float64, 1-D):
    ``xs`` the distinct values of ``x`` in increasing order, ``ys`` the fitted values (ties in
    ``x`` are first averaged, as scikit-learn does)."""
    x, order = torch.sort(x.to(FIT_DTYPE), stable=True)
    xs, inverse, counts = torch.unique_consecutive(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(xs.numel(), dtype=FIT_DTYPE, device=x.device).index_add(
        0, inverse, y.to(FIT_DTYPE)[order])
    counts = counts.to(FIT_DTYPE)
    return xs, _pava(counts, sums)


def isotonic_predict(xs: Tensor, ys: Tensor, length: Tensor, v: Tensor) -> Tensor:
    """Linear interpolation ``[C, N]`` of thresholds ``xs, ys`` ``[C, K]`` (the first ``length[c]``
    entries of row ``c`` are valid) at ``v [C, N]``, clipped to each row's range (scipy's
    ``interp1d`` arithmetic, which scikit-learn uses)."""
    last = (length - 1)[:, None]
    lo_x, hi_x = xs[:, :1], xs.gather(1, last)
    v = torch.minimum(torch.maximum(v.to(FIT_DTYPE), lo_x), hi_x)
    hi = torch.searchsorted(xs.contiguous(), v.contiguous(), right=False).clamp(min=1)
    hi = torch.minimum(hi, last.clamp(min=1)).clamp(max=xs.shape[1] - 1)
    lo = (hi - 1).clamp(min=0)
    x_lo, x_hi, y_lo, y_hi = xs.gather(1, lo), xs.gather(1, hi), ys.gather(1, lo), ys.gather(1, hi)
    out = (y_hi - y_lo) / (x_hi - x_lo) * (v - x_lo) + y_lo
    return torch.where(last == 0, ys[:, :1].expand_as(v), out)


class IsotonicRegression(ResizableBuffers, Calibrator):
    """One isotonic regression of ``[y = c]`` on ``p_c`` per class (vectorised over the samples;
    the pooling iterates over rounds of merges), renormalised; two classes: class 1's, binary."""

    inputs = "probabilities"
    resizable_buffers = ("xs", "ys", "length")

    def __init__(self):
        super().__init__()
        self.register_buffer("xs", torch.zeros(0, 1, dtype=FIT_DTYPE))
        self.register_buffer("ys", torch.zeros(0, 1, dtype=FIT_DTYPE))
        self.register_buffer("length", torch.zeros(0, dtype=torch.long))

    def fit(self, probs: Tensor, labels: Tensor, **extra: Any) -> IsotonicRegression:
        check_fit_inputs(self, probs, labels)
        probs = probs.detach()
        onehot = F.one_hot(labels.to(probs.device), probs.shape[1])
        fits = [isotonic_fit(probs[:, c], onehot[:, c]) for c in range(probs.shape[1])]
        k = max(xs.numel() for xs, _ in fits)
        pad = lambda t: torch.cat([t, t[-1:].expand(k - t.numel())])  # noqa: E731
        device = self.length.device
        self.xs = torch.stack([pad(xs) for xs, _ in fits]).to(device)
        self.ys = torch.stack([pad(ys) for _, ys in fits]).to(device)
        self.length = torch.tensor([xs.numel() for xs, _ in fits], device=device)
        return self

    def one_vs_rest(self, probs: Tensor) -> Tensor:
        """The per-class isotonic estimates ``[N, C]`` before renormalisation."""
        check_fitted(self, probs, self.length.numel())
        return isotonic_predict(self.xs, self.ys, self.length, probs.T).T

    def forward(self, probs: Tensor) -> Tensor:
        return one_vs_rest(self.one_vs_rest(probs), probs).to(probs.dtype)


CARD = Card(
    name="isotonic_regression", kind="calibrator",
    title="Transforming classifier scores into accurate multiclass probability estimates",
    paper="https://doi.org/10.1145/775047.775151",
    summary="Non-parametric monotone calibration: per class, the least-squares non-decreasing "
            "map of p_c onto [y = c] (PAV), linearly interpolated and clipped as scikit-learn's "
            "IsotonicRegression; one-vs-rest, renormalised.",
    formula="g_c = argmin_{g non-decreasing} sum_i (g(p_ic) - [y_i = c])^2 (ties in p averaged "
            "first), linear between the fitted points, clipped outside [min p_c, max p_c]; "
            "q = g(p) / sum_c g_c(p_c) (two classes: [1 - g_1(p_1), g_1(p_1)])",
    left_out="Sample weights; decreasing fits. A row whose estimates are all 0 keeps p "
             "(the paper does not say).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(IsotonicRegression, card=CARD)
