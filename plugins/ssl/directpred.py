"""DirectPred: BYOL's linear predictor set directly from the eigen-decomposition of the
moving-average correlation of the online embeddings, instead of being trained.

Tian, Chen & Ganguli, "Understanding Self-supervised Learning Dynamics without Contrastive
Pairs", ICML 2021 (eq. 18-19); settings from the authors' code (facebookresearch/luckmatters,
``predictor_reg=corr``, ``balance_type=boost_scale``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.distributed import sum_over_ranks
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import LinearPredictor, check_teacher, negative_cosine, teacher_target_example
from sdk.types import Batch, Loss, Views


def directpred_weight(corr: Tensor, eps: float = 0.01) -> Tensor:
    """``W_p = U diag(p) U^T`` from the symmetric correlation ``F = U diag(s) U^T`` ``[D, D]``:
    ``p_j = sqrt(max(s_j, 0) / max_k s_k) + eps`` (eq. 18: the square root boosts the small
    eigenvalues, ``eps`` keeps every direction predicted); computed in float64."""
    f = corr.double()
    s, u = torch.linalg.eigh((f + f.T) / 2)
    s = s.clamp_min(0)
    p = torch.sqrt(s / s.max().clamp_min(torch.finfo(torch.float64).tiny)) + eps
    return ((u * p) @ u.T).to(corr.dtype)


class DirectPred(Objective):
    """BYOL's loss (``sum_{v != w} 2 - 2 cos(W_p z_v, sg(z'_w)) / (V - 1)`` per sample, ``z'``
    the ``ema`` teacher's projections in ``Views.extras["teacher"]``) with DirectPred's linear
    predictor ``W_p`` (:class:`sdk.ssl.LinearPredictor`, ``dim x dim``, no bias), which the
    objective's own event listeners set:

    * ``after_forward``: adds the correlation ``f f^T`` (and ``f``) of every online embedding
      ``f`` (``Views.embeddings``, detached) of the micro-batch;
    * ``after_optimizer_step``: the step's mean ``F`` (over the views, the micro-batches and,
      under DDP, every rank, so all ranks set the same weights) enters the moving average
      ``F^ <- rho F^ + (1 - rho) F`` (eq. 19; ``F^ = F`` at the first step); every ``freq``
      steps (the first included) ``W_p`` is set by :func:`directpred_weight` from ``F^`` (minus
      ``m^ m^T``, the moving-average mean, when ``zero_mean``).

    ``F^`` and ``m^`` are buffers (checkpointed with the objective). Between settings
    (``freq > 1``) ``W_p`` trains by gradient, as in the authors' code; called outside a
    Trainer the objective is BYOL with a linear predictor."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = False  # per sample given W_p (whose statistics are all-reduced, no gradient)

    def __init__(self, dim: Annotated[int, Ge(1)] = 256,
                 rho: Annotated[float, Interval(ge=0, lt=1)] = 0.3,
                 eps: Annotated[float, Ge(0)] = 0.01, freq: Annotated[int, Ge(1)] = 1,
                 zero_mean: bool = False):
        super().__init__()
        self.rho, self.eps, self.freq, self.zero_mean = rho, eps, freq, zero_mean
        self.predictor = LinearPredictor(dim, owner="objective 'directpred'")
        self.register_buffer("corr", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._sums: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, views: Views, batch: Batch) -> Loss:
        targets = check_teacher("objective 'directpred'", views)
        preds = [self.predictor(z, f"Views.embeddings[{v}]") for v, z in enumerate(views.embeddings)]
        n = len(preds)
        per_sample = torch.stack([2 + 2 * negative_cosine(p, t) for v, p in enumerate(preds)
                                  for w, t in enumerate(targets) if v != w]).sum(0) / (n - 1)
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    @torch.no_grad()
    def after_forward(self, state: Any) -> None:
        """Add this micro-batch's ``f f^T`` to the step's sums."""
        f = torch.cat([z.detach() for z in state.views.embeddings]).double()
        add = (f.T @ f, f.sum(dim=0), f.new_tensor(float(f.shape[0])))
        self._sums = add if self._sums is None else tuple(a + b for a, b in zip(self._sums, add))

    @torch.no_grad()
    def after_optimizer_step(self, state: Any) -> None:
        """Move ``F^`` and ``m^`` to the step's means; set ``W_p`` every ``freq`` steps."""
        if self._sums is None:
            return
        total, first, count = (sum_over_ranks(t) for t in self._sums)
        self._sums = None
        rho = (self.steps > 0).to(self.corr.dtype) * self.rho  # 0 at the first step: F^ = F
        self.corr.mul_(rho).add_((1 - rho) * total / count)
        self.mean.mul_(rho).add_((1 - rho) * first / count)
        self.steps.add_(1)
        if (state.step - 1) % self.freq == 0:
            f = self.corr - torch.outer(self.mean, self.mean) if self.zero_mean else self.corr
            w = self.predictor.weight
            w.copy_(directpred_weight(f, self.eps).to(w.dtype))

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of ``[B, dim]`` projections and the teacher's."""
        return teacher_target_example(batch_size, self.predictor.dim, generator)


CARD = Card(
    name="directpred", kind="objective",
    title="Understanding Self-supervised Learning Dynamics without Contrastive Pairs",
    paper="arXiv:2102.06810",
    summary="DirectPred: BYOL's linear predictor is not trained but set from the eigen-"
            "decomposition of the moving-average correlation of the online embeddings.",
    formula="L = sum_{v != w} (2 - 2 cos(W_p z_v, sg(z'_w))) / (V - 1); "
            "F = E[f f^T] (online embeddings, both views); F^ <- rho F^ + (1 - rho) F; "
            "F^ = U diag(s) U^T; W_p = U diag(sqrt(s_j / max s) + eps) U^T every freq steps",
    left_out="An objective (BYOL's loss with the linear predictor it sets through its own "
             "event listeners) rather than a callback beside byol: the predictor is the "
             "objective's. Use with the ema teacher; byol(hidden_dim=None) is the paper's "
             "baseline of the same linear predictor trained by gradient. "
             "Defaults are the authors' published DirectPred command (rho 0.3, eps 0.01, "
             "freq 1, no mean subtraction); the paper's other variants (DirectCopy, eps inside "
             "the square root, other powers than 1/2, shrinking by a regulariser) are not "
             "implemented. The correlation is of the predictor's input, the embeddings the "
             "objective receives (the authors' dyn_bn, a batch norm before it, is not applied); "
             "it is accumulated in float64.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DirectPred, card=CARD)
