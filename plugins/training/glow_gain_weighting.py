"""GLOW's gain-based loss weighting: each sample's loss is compared with its loss at its previous
presentation; a sample whose loss did not fall (no learning gain, or a regression) weighs more,
one that is being learnt weighs less, with the weights clipped to [0.5, 5].

Tian, Ma, Xu, Lyu, Li, Dong, Chu, Wang & Shen, "Learning from Mistakes: Negative Reasoning
Samples Enhance Out-of-Domain Generalization"
(GLOW, arXiv:2601.04992), following the authors' code (Eureka-Maggie/GLOW:
``CustomSeq2SeqTrainer.compute_loss`` with its ``loss_history`` keyed by sample id).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import distributed
from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows
from sdk.sample_stats import SampleStats
from sdk.types import Batch

OWNER = "reweighter 'glow_gain_weighting'"


def gain_weights(gain: Tensor, *, alpha: float = 3.0, beta: float = 10.0, low: float = 0.5,
                 high: float = 5.0) -> Tensor:
    """``w = clamp(alpha (1 - sigmoid(beta gain)), low, high)``, ``gain = l_prev - l``."""
    return (alpha * (1 - torch.sigmoid(beta * gain))).clamp(low, high)


class GLOWGainWeighting(Reweighter):
    """Per-sample weights ``w_i / B`` (``normalize = False``: the loss is the authors'
    ``mean_i w_i l_i``, the weights detached) with ``w_i`` from :func:`gain_weights` of the gain
    ``l_prev,i - l_i``; ``l_prev,i`` is the sample's loss at its last presentation (kept per
    ``Batch.index`` in :class:`sdk.sample_stats.SampleStats`, updated in training mode after the
    weights are computed), and the (global) batch's mean loss for a sample never seen. During
    the first epoch (``epoch < 1``: the Trainer's epoch, read at every epoch start, or
    :meth:`set_epoch`) every weight is 1. ``num_samples`` bounds ``Batch.index``."""

    normalize = False

    def __init__(self, alpha: Annotated[float, Gt(0)] = 3.0, beta: Annotated[float, Gt(0)] = 10.0,
                 min_weight: Annotated[float, Ge(0)] = 0.5, max_weight: Annotated[float, Gt(0)] = 5.0,
                 num_samples: Annotated[int, Ge(1)] = 4096):
        super().__init__()
        if min_weight > max_weight:
            raise ConfigError(f"{OWNER}: min_weight={min_weight} exceeds max_weight={max_weight}",
                              param="min_weight")
        self.alpha, self.beta, self.min_weight, self.max_weight = alpha, beta, min_weight, max_weight
        self.stats = SampleStats(num_samples)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    def set_epoch(self, epoch: int) -> None:
        """The epoch being trained (0 = the first, unweighted)."""
        self.epoch.fill_(epoch)

    def on_epoch_start(self, state: Any) -> None:
        self.set_epoch(state.epoch)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: a second-epoch batch half of whose rows have a history."""
        index = torch.arange(batch_size)
        self.set_epoch(1)
        self.stats.update(index[: batch_size // 2], torch.rand(batch_size // 2, generator=generator))
        per_sample = torch.rand(batch_size, generator=generator) + 0.5
        return per_sample.requires_grad_(), Batch(index=index)

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows(OWNER, per_sample, batch)
        index = self.stats.check_index(OWNER, batch.index, per_sample.shape[0])
        l = per_sample.detach().float()
        with torch.no_grad():
            mean = distributed.gather_no_grad(l).mean()
            prev = torch.where(self.stats.seen[index] > 0, self.stats.loss[index], mean)
            w = gain_weights(prev - l, alpha=self.alpha, beta=self.beta, low=self.min_weight,
                             high=self.max_weight)
            w = torch.where(self.epoch >= 1, w, torch.ones_like(w))
            if self.training:
                self.stats.update(index, l)
        return (w / l.shape[0]).to(per_sample.dtype)


CARD = Card(
    name="glow_gain_weighting", kind="reweighter",
    title="Learning from Mistakes: Negative Reasoning Samples Enhance Out-of-Domain Generalization",
    paper="arXiv:2601.04992",
    summary="Gain-based loss reweighting: a sample whose loss fell since its last presentation "
            "weighs less, one that stagnated or regressed weighs more; weights clipped to "
            "[0.5, 5], all 1 in the first epoch.",
    formula="Delta_i = l_prev,i - l_i (detached; l_prev = the batch mean for a sample never seen); "
            "w_i = clamp(alpha (1 - sigmoid(beta Delta_i)), 0.5, 5); w_i = 1 in epoch 0; loss = "
            "(1/B) sum_i w_i l_i",
    left_out="The LLM supervised fine-tuning on positive and negative chain-of-thought "
             "trajectories (here one loss per sample: the authors' per-token loss averaged over "
             "the sequence's tokens is the objective's business), the 22-pattern analysis and the "
             "RL-initialisation experiments. alpha and beta are command-line arguments in the "
             "authors' code without defaults; 3 and 10 are the values its comments give. The "
             "missing-history fallback is the global batch's mean under DDP (the authors': each "
             "GPU's own batch). num_samples bounds Batch.index (the history's size).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GLOWGainWeighting, card=CARD)
