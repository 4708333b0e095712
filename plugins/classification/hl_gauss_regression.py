"""HL-Gauss: regression trained as classification over fixed bins with a Gaussian histogram target.

Farebrother et al., "Stop Regressing: Training Value Functions via Classification for Scalable
Deep RL", ICML 2024 (arXiv:2403.03950), Sec. 3 and Appendix A (the listing ``HLGaussLoss``);
the histogram loss is Imani & White, "Improving Regression Performance with Distributional
Losses", ICML 2018. The target of a scalar ``y`` is the mass of ``N(y, sigma^2)`` in each bin,
renormalised to the support; the prediction is the expectation of the bin centres. The paper
recommends ``sigma = 0.75`` bin widths.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt

from sdk import classification as cls
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def support(min_value: float, max_value: float, num_bins: int, *, device=None,
            dtype=torch.float32) -> torch.Tensor:
    """The ``num_bins + 1`` bin edges, evenly spaced over ``[min_value, max_value]``."""
    return torch.linspace(min_value, max_value, num_bins + 1, device=device, dtype=dtype)


def histogram_target(y: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """``p_k = (Phi((e_{k+1} - y) / sigma) - Phi((e_k - y) / sigma)) / (Phi((e_K - y) / sigma)
    - Phi((e_0 - y) / sigma))`` [B, K]: the Gaussian's mass per bin, normalised to the support
    (``y`` clipped to it, so that mass never vanishes)."""
    y = y.to(edges.dtype).clamp(edges[0], edges[-1])
    cdf = torch.special.erf((edges - y[:, None]) / (math.sqrt(2) * sigma))
    return (cdf[:, 1:] - cdf[:, :-1]) / (cdf[:, -1:] - cdf[:, :1])


def decode(logits: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The prediction ``sum_k softmax(z)_k c_k`` [B], ``c_k`` the bin centres."""
    centres = (edges[1:] + edges[:-1]) / 2
    return cls.log_probs(logits).exp() @ centres.to(cls.compute_dtype(logits))


def hl_gauss_loss(logits: torch.Tensor, y: torch.Tensor, edges: torch.Tensor,
                  sigma: float) -> torch.Tensor:
    """Per-sample ``-sum_k p_k(y) log softmax(z)_k``."""
    log_p = cls.log_probs(logits)
    return -(histogram_target(y, edges.to(log_p.dtype), sigma) * log_p).sum(-1)


class HLGaussRegression(Objective):
    """HL-Gauss on ``Views.logits`` [B, num_bins] against real targets ``Batch.targets`` [B];
    :meth:`predict` decodes logits into values."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS})
    batch_coupled = False

    def __init__(self, min_value: float = -10.0, max_value: float = 10.0,
                 num_bins: Annotated[int, Ge(2)] = 51, sigma_ratio: Annotated[float, Gt(0)] = 0.75):
        super().__init__()
        if not max_value > min_value:
            raise ConfigError(f"hl_gauss_regression: max_value must exceed min_value, got "
                              f"[{min_value}, {max_value}]", param="max_value")
        self.min_value, self.max_value, self.num_bins = min_value, max_value, num_bins
        self.sigma = sigma_ratio * (max_value - min_value) / num_bins
        self.register_buffer("edges", support(min_value, max_value, num_bins, dtype=torch.float64),
                             persistent=False)

    def _check(self, views: Views, batch: Batch) -> torch.Tensor:
        z, y = views.logits, batch.targets
        if z.dim() != 2 or z.shape[1] != self.num_bins:
            raise ShapeError(f"hl_gauss_regression: Views.logits must be [B, num_bins={self.num_bins}], "
                             f"got {list(z.shape)}")
        if y.dim() != 1 or y.shape[0] != z.shape[0] or y.dtype == torch.bool or y.is_complex():
            raise ShapeError(f"hl_gauss_regression: Batch.targets must be real values [{z.shape[0]}], "
                             f"got {y.dtype} {list(y.shape)}")
        return y

    def forward(self, views: Views, batch: Batch) -> Loss:
        y = self._check(views, batch)
        per_sample = hl_gauss_loss(views.logits, y, self.edges, self.sigma)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The decoded values [B] of logits [B, num_bins]."""
        return decode(logits, self.edges)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = torch.randn(batch_size, self.num_bins, generator=generator).requires_grad_()
        y = (self.max_value - self.min_value) * (torch.rand(batch_size, generator=generator) - 0.5)
        return Views(logits=logits), Batch(targets=y + (self.max_value + self.min_value) / 2)


CARD = Card(
    name="hl_gauss_regression", kind="objective",
    title="Stop Regressing: Training Value Functions via Classification for Scalable Deep RL",
    paper="arXiv:2403.03950",
    summary="Regression as classification: cross-entropy of bin logits against the mass of a "
            "Gaussian around the target in each bin (HL-Gauss); the prediction is the "
            "expected bin centre.",
    formula="e_k = min + k (max - min) / K; p_k(y) = [Phi((e_{k+1} - y) / s) - Phi((e_k - y) / s)] "
            "/ [Phi((e_K - y) / s) - Phi((e_0 - y) / s)], s = sigma_ratio (max - min) / K; "
            "L = -sum_k p_k(y) log softmax(z)_k; y_hat = sum_k softmax(z)_k (e_k + e_{k+1}) / 2",
    left_out="The paper's value-based RL (Q-learning targets, the two-hot and C51 variants it "
             "compares) is not implemented: the loss regresses given real targets. Targets are "
             "clipped to [min_value, max_value] (the paper's listing renormalises by the mass "
             "inside the support, which vanishes for a target far outside). min_value, "
             "max_value and num_bins are per task in the paper; the defaults (-10, 10, 51) are "
             "a starting point, sigma_ratio = 0.75 is the paper's recommendation. The support is "
             "kept in float64 and cast to the logits' compute dtype.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(HLGaussRegression, card=CARD)
