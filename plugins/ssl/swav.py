"""SwAV: swapped prediction of online cluster assignments (Sinkhorn-Knopp codes) between views.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import nn

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, resolve_gather
from sdk.errors import RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import at_least_float32, sinkhorn
from sdk.types import Batch, Loss, Views


def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
              temperature: float = 0.1) -> torch.Tensor:
    """``sum_i sum_{v != i} H(q_i, softmax(s_v / T)) / (V - 1) / len(codes)``: every view ``v``
    predicts the codes ``q_i`` of each view ``i`` that has codes (the global ones, listed first)
    from its prototype scores ``s_v`` ``[B, K]``; ``H(q, p) = -mean_b sum_k q log p`` (eq. 1-2)."""
    log_p = [F.log_softmax(at_least_float32(s) / temperature, dim=1) for s in scores]
    n = len(scores)
    total = 0
    for i, q in enumerate(codes):
        total = total + sum(-(q * log_p[v]).sum(1).mean() for v in range(n) if v != i) / (n - 1)
    return total / len(codes)


class SwAV(Objective):
    """SwAV's loss on the encoder's projections (``Views.embeddings``, L2-normalised here): the
    scores of each view with ``n_prototypes`` learnable prototypes (unit vectors, owned by this
    objective and renormalised after every optimizer step), Sinkhorn-Knopp codes of the first
    ``n_global`` views (``iterations``, ``epsilon``), and the swapped prediction of each view's
    codes from every other view's scores at ``temperature``.

    ``gather`` ("auto": under DDP): scores and codes are computed over the batch of every rank,
    so the equipartition is over the global batch (the authors all-reduce inside
    Sinkhorn-Knopp); each rank computes the same global loss. ``queue_length`` > 0 keeps the
    projections of the last ``queue_length`` samples of each global view (a buffer,
    checkpointed) and, once full, adds their scores to the Sinkhorn-Knopp input, as the authors
    do for small batches. ``freeze_prototypes_steps``: the prototypes' gradients are dropped
    for the first steps (the authors: 313, one ImageNet epoch at batch 4096)."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, dim: Annotated[int, Ge(1)] = 128,
                 n_prototypes: Annotated[int, Ge(1)] = 3000,
                 temperature: Annotated[float, Gt(0)] = 0.1,
                 iterations: Annotated[int, Ge(1)] = 3, epsilon: Annotated[float, Gt(0)] = 0.05,
                 n_global: Annotated[int, Ge(1)] = 2, queue_length: Annotated[int, Ge(0)] = 0,
                 freeze_prototypes_steps: Annotated[int, Ge(0)] = 0, gather: Gather = "auto"):
        super().__init__()
        self.dim, self.temperature, self.iterations, self.epsilon = dim, temperature, iterations, epsilon
        self.n_global, self.queue_length = n_global, queue_length
        self.freeze_prototypes_steps, self.gather = freeze_prototypes_steps, gather
        self.prototypes = nn.Linear(dim, n_prototypes, bias=False)
        self.normalize_prototypes()
        self.register_buffer("queue", torch.zeros(n_global if queue_length else 0, queue_length, dim))
        self._queued = 0  # rows of the queue filled so far (checkpointed as extra state)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def before_optimizer_step(self, state: State) -> None:
        if state.step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    def after_optimizer_step(self, state: State) -> None:
        self.normalize_prototypes()

    def get_extra_state(self) -> dict[str, Any]:
        return {"queued": self._queued}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._queued = int(state["queued"])

    def _scores(self, z: torch.Tensor, v: int) -> torch.Tensor:
        if z.shape[1] != self.dim:
            raise ShapeError(f"objective 'swav': Views.embeddings[{v}] must be [B, {self.dim}] (the "
                             f"prototypes' dim), got {list(z.shape)}")
        w = self.prototypes.weight
        return F.normalize(z.to(w.dtype), dim=1) @ w.T

    def forward(self, views: Views, batch: Batch) -> Loss:
        if views.n_views < self.n_global:
            raise RequirementError(f"objective 'swav' needs at least n_global={self.n_global} "
                                   f"views, got {views.n_views}")
        zs = views.embeddings
        if resolve_gather(self.gather):
            zs = [gather_with_grad(z) for z in zs]
        scores = [self._scores(z, v) for v, z in enumerate(zs)]
        b = scores[0].shape[0]
        use_queue = self.queue_length > 0 and self._queued >= self.queue_length
        codes = []
        for i in range(self.n_global):
            s = scores[i]  # sinkhorn takes no gradient
            if use_queue:
                s = torch.cat([self.queue[i].to(s.dtype) @ self.prototypes.weight.detach().T, s])
            codes.append(sinkhorn(s, self.iterations, self.epsilon, bound=1.0)[-b:])
        value = swav_loss(scores, codes, self.temperature)
        if self.queue_length and self.training:
            self._enqueue([F.normalize(z.detach(), dim=1) for z in zs[:self.n_global]])
        return Loss(value=value)

    @torch.no_grad()
    def _enqueue(self, zs: list[torch.Tensor]) -> None:
        new = torch.stack(zs).to(self.queue.dtype)[:, -self.queue_length:]  # [n_global, b, D]
        self.queue.copy_(torch.cat([new, self.queue], dim=1)[:, :self.queue_length])
        self._queued = min(self._queued + new.shape[1], self.queue_length)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """``n_global`` views (two at least) of ``[B, dim]`` projections."""
        z = tuple(torch.randn(batch_size, self.dim, generator=generator).requires_grad_()
                  for _ in range(max(2, self.n_global)))
        return Views(embeddings=z), Batch()


CARD = Card(
    name="swav", kind="objective",
    title="Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
    paper="arXiv:2006.09882",
    summary="Online clustering: Sinkhorn-Knopp codes of each global view over learnable "
            "prototypes, predicted from the other views' prototype scores (swapped prediction).",
    formula="s_v = normalize(z_v) C^T; q_i = SinkhornKnopp(s_i; eps, iterations) (equal "
            "prototype mass over the global batch); L = sum_{i < n_global} sum_{v != i} "
            "-mean_b sum_k q_ik log softmax(s_v / T)_k / ((V - 1) n_global)",
    left_out="Multi-crop is the views (sdk.data.multi_crop gives 2 global + 6 local crops, "
             "global first); local crops at a lower resolution need an encoder that takes "
             "both sizes. The queue is used as soon as it is full (the authors also wait for "
             "epoch 15); LARS is not part of the loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SwAV, card=CARD)
