"""EnsLoss: a new random calibrated loss at every step, applied through its derivative.

Dai, "EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing Overfitting in
Classification", 2024 (arXiv:2409.00908); the generator follows the author's code
(github.com/statmlben/ensLoss, losses.py ``ensLoss``): for binary margins ``s_i = y_i f(x_i)``,
``B`` derivatives ``-BC^{-1}(e)``, ``e ~ N(0, 1)`` (inverse Box-Cox, ``lambda = 0``: minus a
log-normal), sorted and capped at ``-1``, are assigned to the margins in rank order (the
smallest margin gets the steepest), divided by ``s`` above 1 (a decaying tail), and shifted by
``-1e-6``: a negative, non-decreasing derivative, i.e. a convex classification-calibrated loss
drawn anew per batch. The surrogate ``mean_i g_i s_i`` with ``g`` detached has exactly that
loss's gradient.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge

from sdk import classification as cls
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

SHIFT = 1e-6
"""Subtracted from every derivative, so that it stays strictly negative (calibration)."""


def box_cox_inverse(e: torch.Tensor, lam: float) -> torch.Tensor:
    """``exp(e)`` for ``lam = 0``, ``max(1 + lam e, 0)^(1 / lam)`` otherwise."""
    if lam == 0:
        return e.exp()
    return (1 + lam * e).clamp_min(0) ** (1 / lam)


def random_derivatives(margins: torch.Tensor, draws: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """The loss derivative at each margin [N] from standard normal ``draws`` [N]: the sorted
    ``max(-BC^{-1}(e), -1)`` assigned by the margins' rank, ``/ s`` where ``s > 1``, ``- 1e-6``."""
    d = (-box_cox_inverse(draws.to(margins.dtype), lam)).clamp_min(-1).sort().values
    g = torch.empty_like(d).scatter_(0, margins.argsort(), d)
    g = torch.where(margins > 1, g / margins.clamp_min(1), g)
    return g - SHIFT


class EnsLoss(Objective):
    """EnsLoss for a binary classifier: ``Views.logits`` [B, 1] (the score ``f(x)``), class ids
    ``Batch.targets`` in {0, 1}. The derivatives of a batch are drawn from the objective's own
    generator (``seed``; its state is checkpointed) over the global batch (``gather``: ranks
    draw alike and each takes its samples' derivatives). ``Loss.per_sample`` is the surrogate
    ``g_i s_i`` (its gradient is the sampled loss's), not a loss value."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = True

    def __init__(self, lam: Annotated[float, Ge(0)] = 0.0, seed: int = 0, gather: Gather = "auto"):
        super().__init__()
        self.lam, self.seed, self.gather = lam, seed, gather
        self._generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> Any:
        return {"rng": self._generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self._generator.set_state(state["rng"])

    def forward(self, views: Views, batch: Batch) -> Loss:
        z, y = views.logits, batch.targets
        if z.shape[1] != 1:
            raise ShapeError(f"ensloss: Views.logits must be one binary score per sample [B, 1], got "
                             f"{list(z.shape)}")
        check_ids("ensloss", "Batch.targets", y, 2 if y.device.type == "cpu" else None)  # no sync
        score = cls.upcast(z[:, 0])
        s = score * (2 * y.to(score.dtype) - 1)
        gathered = resolve_gather(self.gather)
        every = gather_no_grad(s.detach()) if gathered else s.detach()
        draws = torch.randn(every.shape[0], generator=self._generator, dtype=torch.float64)
        g = random_derivatives(every, draws.to(every.device), self.lam)
        offset = rank() * s.shape[0] if gathered else 0
        per_sample = g[offset:offset + s.shape[0]] * s
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = (2 * torch.randn(batch_size, 1, generator=generator)).requires_grad_()
        return Views(logits=logits), Batch(targets=torch.arange(batch_size) % 2)


CARD = Card(
    name="ensloss", kind="objective",
    title="EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing Overfitting in Classification",
    paper="arXiv:2409.00908",
    summary="Binary classification with a random convex calibrated loss per batch, applied "
            "through its derivative: sorted random negative slopes assigned to the margins by "
            "rank, so the ensemble over steps regularises like an ensemble of losses.",
    formula="s_i = y_i f(x_i), y in {-1, 1}; d = sort(max(-BC^{-1}(e), -1)), e ~ N(0, I_B); "
            "g_{(k)} = d_k (k-th smallest margin); g_i <- g_i / s_i if s_i > 1; g_i <- g_i - 1e-6; "
            "L = mean_i sg(g_i) s_i",
    left_out="Binary only, as the paper (one logit per sample). The generator is the author's "
             "code's (inverse Box-Cox of a normal, lambda = 0: log-normal slopes); the code's "
             "other generators (exponential draws) and its unused update period are not "
             "implemented. Draws come from the objective's own seeded CPU generator (its state "
             "in the checkpoint) so that ranks draw alike. value and per_sample are the "
             "surrogate mean(g s), whose gradient is the sampled loss's; the sampled loss's own "
             "value is not computed.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(EnsLoss, card=CARD)
