"""mixup: convex combinations of pairs of inputs and of their labels.

Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt

from sdk.card import Card
from sdk.context import FromData
from sdk.errors import RequirementError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Transform
from sdk.types import Batch


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float | torch.Tensor,
          perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam x + (1 - lam) x[perm], lam y + (1 - lam) y[perm])`` for soft targets ``y``."""
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


class Mixup(Transform):
    """Mixes each sample with a random partner; ``lam ~ Beta(alpha, alpha)`` per batch.

    Class-id targets become soft labels over ``num_classes`` classes; ``extras`` records
    ``mixup_lambda`` and ``mixup_perm``. Acts in training mode only."""

    produces = frozenset({Input.SOFT_LABELS})

    def __init__(self, alpha: Annotated[float, Gt(0)] = 0.2,
                 num_classes: Annotated[int | None, FromData("num_classes")] = None):
        super().__init__()
        self.alpha, self.num_classes = alpha, num_classes
        self._beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))

    def forward(self, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, Batch]:
        if not self.training:
            return x, batch
        if batch.targets is None:
            raise RequirementError("transform 'mixup' needs Batch.targets")
        y = batch.targets
        if y.dim() == 1:
            if self.num_classes is None:
                raise RequirementError("transform 'mixup': class-id targets need num_classes=")
            y = F.one_hot(y.long(), self.num_classes)
        lam = self._beta.sample().to(x.device)
        perm = torch.randperm(x.shape[0], device=x.device)
        x, y = mixup(x, y.to(x.dtype), lam, perm)
        extras = {**batch.extras, "mixup_lambda": lam, "mixup_perm": perm}
        return x, batch.evolve(targets=y, extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        labels = torch.arange(batch_size) % 3
        return torch.randn(batch_size, 16, generator=generator), Batch(targets=F.one_hot(labels, 3).float())


CARD = Card(
    name="mixup", kind="transform", title="mixup: Beyond Empirical Risk Minimization",
    paper="arXiv:1710.09412",
    summary="Trains on convex combinations of sample pairs and of their (one-hot) labels.",
    formula="x~ = lam x_i + (1-lam) x_j, y~ = lam y_i + (1-lam) y_j, lam ~ Beta(alpha, alpha)",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Mixup, card=CARD)
