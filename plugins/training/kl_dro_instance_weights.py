"""Instance weights from KL-regularised distributionally robust optimisation: the worst case
over reweightings of the batch, penalised by the KL divergence to uniform weights, gives each
sample a weight proportional to the exponential of its (adversarial) loss.

Xu, Zhang, Liu, Kong & Ji (with Chen), "Doubly Robust Instance-Reweighted Adversarial Training",
ICLR 2024 (arXiv:2308.00311), eq. (3)-(4): max_w sum_i w_i l_i - r KL(w || 1/B) over the simplex
has the closed form w_i = exp(l_i / r) / sum_j exp(l_j / r).
"""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows, global_softmax
from sdk.types import Batch


def kl_dro_weights(per_sample: Tensor, r: float = 1.0) -> Tensor:
    """``softmax(l / r)`` over the batch (float32, detached): the maximiser of
    ``sum_i w_i l_i - r KL(w || uniform)`` over the simplex."""
    return torch.softmax(per_sample.detach().float() / r, dim=0)


class KLDROInstanceWeights(Reweighter):
    """Weights ``w = softmax(l / r)`` over the global batch, detached (the paper's weights
    are the solution of the inner maximisation; no gradient flows through them). Under DDP the
    losses of every rank enter the softmax and each rank keeps its own rows, scaled by the world
    size, so the ranks' averaged loss equals one process's ``sum_i w_i l_i`` (``normalize =
    False``: the weights sum to 1)."""

    normalize = False

    def __init__(self, r: Annotated[float, annotated_types.Gt(0)] = 1.0):
        super().__init__()
        self.r = r

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows("reweighter 'kl_dro_instance_weights'", per_sample, batch)
        return global_softmax(per_sample.detach().float() / self.r).to(per_sample.dtype)


CARD = Card(
    name="kl_dro_instance_weights", kind="reweighter",
    title="Doubly Robust Instance-Reweighted Adversarial Training",
    paper="arXiv:2308.00311",
    summary="KL-regularised DRO instance weights: w = softmax(l / r) over the batch (detached), "
            "so high-loss (adversarially vulnerable) samples weigh more; r -> inf is uniform.",
    formula="w = argmax_{w in simplex} sum_i w_i l_i - r KL(w || 1/B) = softmax(l / r); "
            "loss = sum_i w_i l_i (weights detached, over the global batch under DDP)",
    left_out="The compositional bilevel optimisation (CID) the paper uses to make the "
             "adversarial inner loop and the weights jointly consistent: weights here come from "
             "the current batch's losses in closed form; pair it with an adversarial transform "
             "for the adversarial losses. The paper tunes r per dataset; r = 1 is our default.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(KLDROInstanceWeights, card=CARD)
