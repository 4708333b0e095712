"""Test-time batch-normalisation statistics.

Schneider, Rusak, Eck, Bringmann, Brendel and Bethge, "Improving robustness against common
corruptions by covariate shift adaptation", NeurIPS 2020.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk.adaptation import batch_moments, batch_norm_layers
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Adapter
from sdk.types import Batch


def mixed_statistics(source_mean: Tensor, source_var: Tensor, mean: Tensor, var: Tensor, n: int,
                     prior: float) -> tuple[Tensor, Tensor]:
    """Schneider et al.'s Eq. 1: ``mu = N/(N+n) mu_s + n/(N+n) mu_t`` and likewise the variance,
    ``N`` the prior's pseudo sample size, ``n`` the test batch size."""
    w = prior / (prior + n)
    return w * source_mean + (1 - w) * mean.to(source_mean), w * source_var + (1 - w) * var.to(source_var)


class BNAdapt(Adapter):
    """Each BN layer normalises a test batch with its moments mixed with the training
    statistics (``prior = 0``: the batch's own, the paper's full adaptation); the training
    statistics stay the prior for every batch. Nothing is learned."""

    def __init__(self, prior: Annotated[float, Ge(0)] = 0.0):
        super().__init__()
        self.prior = prior
        self._source: list[tuple[Tensor, Tensor]] | None = None

    def _mix(self, source: tuple[Tensor, Tensor], module: nn.Module, args: tuple[Any, ...]) -> None:
        (h,) = args
        mean, var = batch_moments(h, f"adapter {self.name!r}")
        mixed = mixed_statistics(*source, mean, var, h.shape[0], self.prior)
        module.running_mean.copy_(mixed[0])
        module.running_var.copy_(mixed[1])

    def forward(self, model: nn.Module, x: Tensor, batch: Batch) -> Tensor:
        layers = batch_norm_layers(model, f"adapter {self.name!r}", running_stats=True)
        if self._source is None:
            self._source = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
        hooks = [m.register_forward_pre_hook(partial(self._mix, src)) for m, src in zip(layers, self._source)]
        try:
            for m in layers:
                m.eval()
            with torch.no_grad():
                return model(x)
        finally:
            for hook in hooks:
                hook.remove()

    def reset(self) -> None:
        super().reset()
        self._source = None


CARD = Card(
    name="bn_adapt", kind="adapter",
    title="Improving robustness against common corruptions by covariate shift adaptation",
    paper="arXiv:2006.16971",
    summary="Re-estimates every BatchNorm layer's mean and variance on the test batch, mixed "
            "with the training statistics by a pseudo sample size N (prior; 0 = full "
            "adaptation, the paper's default when batches are large); no gradient step.",
    formula="mu = N/(N+n) mu_s + n/(N+n) mu_t, sigma^2 = N/(N+n) sigma_s^2 + n/(N+n) sigma_t^2; "
            "BN(h) = gamma (h - mu) / sqrt(sigma^2 + eps) + beta",
    left_out="The test batch's variance is the biased one (what BatchNorm normalises with in "
             "training); n counts samples, not spatial positions. The model keeps the last "
             "batch's mixed statistics in its running buffers until reset(). Other "
             "normalisation layers (GroupNorm, LayerNorm) are not adapted.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BNAdapt, card=CARD)
