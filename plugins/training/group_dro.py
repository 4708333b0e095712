"""Group distributionally robust optimisation: minimise the loss of the worst group, through
weights on the groups that follow their losses by exponentiated gradient ascent.

Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks for Group Shifts: On
the Importance of Regularization for Worst-Case Generalization", ICLR 2020 (Algorithm 1, in
its minibatch form).
"""

from __future__ import annotations

from typing import Annotated

import annotated_types
import torch
from torch import Tensor

from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.types import Batch


def group_losses(per_sample: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean loss ``[G]`` of each group in the batch (0 for a group absent from it) and each
    group's count ``[G]``, both float32."""
    counts = torch.zeros(num_groups, device=per_sample.device).index_add_(
        0, groups, torch.ones_like(per_sample, dtype=torch.float32))
    sums = torch.zeros(num_groups, device=per_sample.device).index_add_(0, groups, per_sample.float())
    return sums / counts.clamp_min(1), counts


class GroupDRO(Reweighter):
    """Group weights ``q`` (a buffer, so checkpoints carry it) updated on every training batch
    as ``q_g <- q_g exp(eta L_g)``, normalised; sample ``i`` of group ``g`` weighs
    ``q_g / n_g``, so the reduced loss is ``sum_g q_g L_g`` (``normalize = False``). Groups are
    the ids of ``Batch.domain``, ``0 .. num_groups - 1``. In evaluation mode ``q`` stays."""

    normalize = False

    def __init__(self, num_groups: Annotated[int, annotated_types.Ge(1)] = 2,
                 eta: Annotated[float, annotated_types.Gt(0)] = 0.01):
        super().__init__()
        self.num_groups, self.eta = num_groups, eta
        self.register_buffer("q", torch.full((num_groups,), 1.0 / num_groups))

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        groups = batch.domain
        if groups is None:
            raise RequirementError("reweighter 'group_dro' needs Batch.domain (group ids), got None")
        if groups.shape != per_sample.shape:
            raise ShapeError(f"reweighter 'group_dro': Batch.domain {list(groups.shape)} does not match the "
                             f"per-sample losses {list(per_sample.shape)}")
        low, high = (int(v) for v in torch.aminmax(groups))
        if low < 0 or high >= self.num_groups:
            raise ShapeError(f"reweighter 'group_dro': Batch.domain holds group ids in [{low}, {high}], but "
                             f"num_groups={self.num_groups} allows 0 .. {self.num_groups - 1}")
        with torch.no_grad():
            losses, counts = group_losses(per_sample.detach(), groups, self.num_groups)
            if self.training:
                self.q.copy_(torch.softmax(self.q.log() + self.eta * losses, dim=0))
            return (self.q / counts.clamp_min(1))[groups].to(per_sample.dtype)


CARD = Card(
    name="group_dro", kind="reweighter",
    title="Distributionally Robust Neural Networks for Group Shifts: On the Importance of "
          "Regularization for Worst-Case Generalization",
    paper="arXiv:1911.08731",
    summary="Minimises the worst group's loss: group weights q follow the groups' batch losses "
            "by exponentiated gradient ascent; groups from Batch.domain.",
    formula="L_g = mean_{i in g} l_i (0 if g is absent); q_g <- q_g exp(eta L_g) / "
            "sum_h q_h exp(eta L_h); loss = sum_g q_g L_g, i.e. w_i = q_{g(i)} / n_{g(i)}, "
            "reduced as sum_i w_i l_i",
    left_out="The generalisation adjustment (C / sqrt(n_g) added to L_g) and the strong "
             "L2 penalty / early stopping the paper pairs it with (set them on the optimizer "
             "and the trainer).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GroupDRO, card=CARD)
