"""Learning from aggregate responses: the bag-level, instance-level and interpolating losses.

Javanmard, Chen, Mirrokni, Badanidiyuru & Fu, "Learning from Aggregate responses: Instance
Level versus Bag Level Loss Functions", ICLR 2024 (arXiv:2401.11081): with bags ``a`` of
samples and one aggregate response ``y_a`` (the mean of its members' responses) per bag, the
instance-level square loss is the bag-level one plus a within-bag variance of the
predictions, ``sum_{i in a} (y_a - f_i)^2 = |a| (y_a - f_a)^2 + sum_{i in a} (f_i - f_a)^2``
(``f_a`` the bag's mean prediction): a regulariser. The interpolating estimator weights that
regulariser by ``rho``: 0 is the bag-level loss, 1 the instance-level loss.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Interval

from sdk import classification as cls
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def aggregate_loss(pred: torch.Tensor, response: torch.Tensor, bags: torch.Tensor,
                   rho: float = 1.0) -> torch.Tensor:
    """Per-sample ``(y_a - f_a)^2 + rho (f_i - f_a)^2`` [N] for sample ``i`` of bag ``a``:
    ``f_a`` and ``y_a`` the means of the predictions and of the responses over the bag (one
    [N, N] same-bag matrix: no host sync)."""
    same = (bags[:, None] == bags[None, :]).to(pred.dtype)
    size = same.sum(-1)
    f_bag = same @ pred / size
    y_bag = same @ response.to(pred.dtype) / size
    return (y_bag - f_bag).square() + rho * (pred - f_bag).square()


class AggregateResponseLoss(Objective):
    """The interpolating loss on predictions ``Views.embeddings[0]`` [B, 1] against the bags'
    responses ``Batch.targets`` [B] (every member carries its bag's response; a bag's response
    is the mean over its members), bag ids ``Batch.domain`` [B]. A bag may span the
    batch; with ``gather`` (under DDP) bags are formed over the global batch."""

    requires = {"views": 1, "targets": True, "domain": True}
    consumes = frozenset()
    batch_coupled = True

    def __init__(self, rho: Annotated[float, Interval(ge=0, le=1)] = 1.0, gather: Gather = "auto"):
        super().__init__()
        self.rho, self.gather = rho, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        z, y, bags = views.embeddings[0], batch.targets, batch.domain
        b = z.shape[0]
        if z.dim() != 2 or z.shape[1] != 1:
            raise ShapeError(f"aggregate_response_loss: Views.embeddings[0] must be one prediction per "
                             f"sample [B, 1], got {list(z.shape)}")
        if y.shape != (b,) or y.dtype == torch.bool or y.is_complex():
            raise ShapeError(f"aggregate_response_loss: Batch.targets must be the bags' responses "
                             f"[{b}], got {y.dtype} {list(y.shape)}")
        pred = cls.upcast(z[:, 0])
        response = y.to(pred.dtype)
        offset = 0
        if resolve_gather(self.gather):
            pred, response, bags = gather_with_grad(pred), gather_no_grad(response), gather_no_grad(bags)
            offset = rank() * b
        per_sample = aggregate_loss(pred, response, bags, self.rho)[offset:offset + b]
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        pred = torch.randn(batch_size, 1, generator=generator).requires_grad_()
        bags = torch.arange(batch_size) // 3
        response = torch.randn(batch_size, generator=generator)
        return Views(embeddings=(pred,)), Batch(targets=response, domain=bags)


CARD = Card(
    name="aggregate_response_loss", kind="objective",
    title="Learning from Aggregate responses: Instance Level versus Bag Level Loss Functions",
    paper="arXiv:2401.11081",
    summary="Regression from one aggregate response per bag of samples: the bag-level square "
            "loss plus rho times the within-bag variance of the predictions (rho = 0: bag-level, "
            "rho = 1: instance-level loss).",
    formula="f_a = mean_{j in a} f_j, y_a = mean_{j in a} y_j; "
            "L = mean_i [(y_{a(i)} - f_{a(i)})^2 + rho (f_i - f_{a(i)})^2]; rho = 1: L = "
            "mean_i (y_{a(i)} - f_i)^2 (instance level; per sample the terms differ, per bag "
            "they agree), rho = 0: bag level (bags weighted by size)",
    left_out="Square loss only (the paper's analysis; its GLM extension is not implemented). "
             "The per-sample normalisation (a bag of k samples counts k times) is ours, chosen so "
             "that rho = 1 is exactly the instance-level loss. The tuned rho of the paper's "
             "experiments depends on the task; the default 1 is the instance-level loss. The "
             "differentially private aggregation mechanism and the choice of bag sizes are not "
             "implemented. The same-bag matrix is [B, B] (bags are found without a host sync).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AggregateResponseLoss, card=CARD)
