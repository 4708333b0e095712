"""Histogram binning: each class probability is replaced by the frequency of that class among
the calibration samples whose probability fell in the same equal-width bin.

Zadrozny & Elkan, "Obtaining calibrated probability estimates from decision trees and naive
Bayesian classifiers", ICML 2001; one-vs-rest with 15 bins as in Guo et al., "On Calibration of
Modern Neural Networks", ICML 2017 (arXiv:1706.04599), section 4.1.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk.calibration import FIT_DTYPE, bin_index, check_fit_inputs, check_fitted, one_vs_rest
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "HistogramBinning", "bin_statistics"]


def _bins(probs: Tensor, n_bins: int) -> Tensor:
    """``[C, N]`` index of the right-closed bin ``((b-1)/M, b/M]`` of each ``p_ic`` (0 in bin 0)."""
    c = probs.shape[1]
    edges = torch.linspace(0, 1, n_bins + 1, dtype=FIT_DTYPE, device=probs.device)[1:-1]
    return bin_index(probs.T.to(FIT_DTYPE), edges.expand(c, n_bins - 1))


def bin_statistics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor]:
    """``(count, positives)`` ``[C, n_bins]``: samples whose ``p_c`` lies in each bin, and how many
    of them are of class ``c``."""
    c = probs.shape[1]
    flat = (_bins(probs, n_bins) + n_bins * torch.arange(c, device=probs.device)[:, None]).reshape(-1)
    onehot = F.one_hot(labels, c).T.to(FIT_DTYPE).reshape(-1)
    zeros = torch.zeros(c * n_bins, dtype=FIT_DTYPE, device=probs.device)
    count = zeros.index_add(0, flat, torch.ones_like(onehot))
    return count.view(c, n_bins), zeros.index_add(0, flat, onehot).view(c, n_bins)


class HistogramBinning(ResizableBuffers, Calibrator):
    """``q_c = theta_{c, bin(p_c)}`` (the class-``c`` frequency of the bin), renormalised over
    classes; with two classes the binary calibrator of class 1."""

    inputs = "probabilities"
    resizable_buffers = ("count", "positives")

    def __init__(self, n_bins: Annotated[int, Ge(1)] = 15):
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("count", torch.zeros(0, n_bins, dtype=FIT_DTYPE))
        self.register_buffer("positives", torch.zeros(0, n_bins, dtype=FIT_DTYPE))

    def fit(self, probs: Tensor, labels: Tensor, **extra: Any) -> HistogramBinning:
        check_fit_inputs(self, probs, labels)
        count, positives = bin_statistics(probs.detach(), labels.to(probs.device), self.n_bins)
        self.count, self.positives = count.to(self.count.device), positives.to(self.count.device)
        return self

    def forward(self, probs: Tensor) -> Tensor:
        check_fitted(self, probs, self.count.shape[0])
        b = _bins(probs, self.n_bins)
        count, positives = self.count.gather(1, b), self.positives.gather(1, b)
        p = probs.T.to(FIT_DTYPE)
        q = torch.where(count > 0, positives / count.clamp_min(1), p)  # an empty bin: no evidence
        return one_vs_rest(q.T, probs).to(probs.dtype)


CARD = Card(
    name="histogram_binning", kind="calibrator",
    title="Obtaining calibrated probability estimates from decision trees and naive Bayesian "
          "classifiers",
    paper="https://dl.acm.org/doi/10.5555/645530.655813",
    summary="Non-parametric: per class, 15 equal-width bins of p_c, each mapped to the fraction "
            "of its calibration samples that are of class c; one-vs-rest, renormalised.",
    formula="theta_cb = #{i : p_ic in B_b, y_i = c} / #{i : p_ic in B_b}, B_b = ((b-1)/M, b/M] "
            "(p = 0 in B_1), M = 15; q_c = theta_{c, b(p_c)}, q = q / sum_c q_c "
            "(two classes: q = [1 - q_1, q_1])",
    left_out="Guo et al.'s bin edges are equal-width (as here), Zadrozny & Elkan's equal-frequency. "
             "A bin no calibration sample fell in keeps the uncalibrated p_c (the papers do not "
             "say); a row whose estimates are all 0 keeps p.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(HistogramBinning, card=CARD)
