"""MYOW: BYOL plus across-sample prediction of a mined neighbour's target projection.

Azabou et al., "Mine Your Own vieW: Self-Supervised Learning Through Across-Sample
Prediction", 2021 (arXiv:2102.10106); mining, heads and weighting from the authors' code
(github.com/nerdslab/myow: ``myow_factory.py``, ``double_byol.py`` cascaded, ``myow_trainer.py``).

For each sample ``i`` a neighbour ``j(i)`` is mined among the other samples of the (global)
batch: the ``k`` nearest, by ``2 - 2 cos``, of the online embedding ``z_1i`` among the
target's ``z'_1j``, one of them drawn at random. A second projector ``r`` (and its momentum
copy ``r'``) and predictor ``q_m`` on top of the first projection (the cascaded layout)
predict the neighbour::

    L_i = 1/(1+w) * 1/2 sum_{v != u} (2 - 2 cos(q(z_vi), sg(z'_ui)))
        + w/(1+w) * (2 - 2 cos(q_m(r(z_1i)), sg(r'(z'_1j(i)))))
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.distributed import Gather, gather_no_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.momentum import cosine_momentum
from sdk.ssl import Predictor, check_teacher, negative_cosine, teacher_target_example
from sdk.types import Batch, Loss, Views


def mine_neighbours(anchors: Tensor, pool: Tensor, k: int, self_index: Tensor,
                    pick: Tensor) -> Tensor:
    """The index in ``pool`` ``[M, D]`` of each anchor's mined view ``[B]``: among the ``k``
    pool rows nearest to the anchor ``[B, D]`` by ``2 - 2 cos`` (its own row ``self_index``
    ``[B]`` excluded), the ``pick``-th (``[B]`` in ``[0, k)``, drawn by the caller)."""
    a = torch.nn.functional.normalize(anchors.detach().float(), dim=1)
    p = torch.nn.functional.normalize(pool.detach().float(), dim=1)
    dist = 2 - 2 * a @ p.T
    rows = torch.arange(a.shape[0], device=a.device)
    dist[rows, self_index] = float("inf")
    nearest = dist.topk(k, dim=1, largest=False).indices
    return nearest[rows, pick]


def mined_weight(step: int, max_steps: int | None, max_weight: float, warmup: float,
                 rampup: float) -> float:
    """``w``: 0 for the first ``warmup`` fraction of the steps, then linear up to ``max_weight``
    at the ``rampup`` fraction (the authors' schedule); ``max_weight`` when the length is
    unknown."""
    if not max_steps:
        return max_weight
    start, end = warmup * max_steps, rampup * max_steps
    if step < start:
        return 0.0
    if step >= end:
        return max_weight
    return max_weight * (step - start) / (end - start)


class MYOW(Objective):
    """MYOW (see the module docstring) on two views: ``Views.embeddings`` are the online
    projections ``z_v`` (the encoder's ``projection_head``), ``Views.extras["teacher"]`` the
    ``ema`` teacher's ``z'_v``. The objective owns the predictor ``q``, the second projector
    ``r`` with its momentum copy ``r'`` (updated in its ``after_optimizer_step`` with the
    cosine schedule ``momentum -> final_momentum``) and the mining predictor ``q_m``, each
    ``dim -> hidden_dim -> dim`` with batch norm inside.

    ``k`` nearest candidates (capped at the ``B - 1`` others of the batch), one drawn at
    random; ``gather`` ("auto": under DDP) mines among the global batch. The weight ``w`` of
    the mined term ramps from 0 to ``max_weight`` (see :func:`mined_weight`)."""

    requires = {"views": 2, "extras": (keys.TEACHER,)}
    batch_coupled = True

    def __init__(self, dim: Annotated[int, Ge(1)] = 256, hidden_dim: Annotated[int, Ge(1)] = 4096,
                 k: Annotated[int, Ge(1)] = 4, max_weight: Annotated[float, Ge(0)] = 1.0,
                 warmup: Annotated[float, Interval(ge=0, le=1)] = 0.0,
                 rampup: Annotated[float, Interval(ge=0, le=1)] = 1.0,
                 momentum: Annotated[float, Interval(ge=0, le=1)] = 0.996,
                 final_momentum: Annotated[float, Interval(ge=0, le=1)] = 1.0,
                 gather: Gather = "auto"):
        super().__init__()
        owner = "objective 'myow'"
        self.predictor = Predictor(dim, hidden_dim, owner=owner)
        self.projector_m = Predictor(dim, hidden_dim, owner=owner)
        self.predictor_m = Predictor(dim, hidden_dim, owner=owner)
        self.target_projector_m = copy.deepcopy(self.projector_m)
        for p in self.target_projector_m.parameters():
            p.requires_grad_(False)
        self.k, self.max_weight, self.warmup, self.rampup = k, max_weight, warmup, rampup
        self.momentum, self.final_momentum, self.gather = momentum, final_momentum, gather
        self.mined_loss_weight = max_weight

    def set_progress(self, step: int, max_steps: int | None) -> None:
        self.mined_loss_weight = mined_weight(step, max_steps, self.max_weight, self.warmup, self.rampup)

    @torch.no_grad()
    def after_optimizer_step(self, state: Any) -> None:
        """``r' <- m r' + (1 - m) r`` (buffers copied), ``m`` on the cosine schedule."""
        m = cosine_momentum(self.momentum, self.final_momentum, state.step, state.trainer.total_steps)
        for t, s in zip(self.target_projector_m.parameters(), self.projector_m.parameters()):
            t.lerp_(s, 1 - m)
        for t, s in zip(self.target_projector_m.buffers(), self.projector_m.buffers()):
            t.copy_(s)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'myow'"
        targets = check_teacher(owner, views)
        z1, z2 = views.embeddings
        t1, t2 = targets
        preds = [self.predictor(z, f"Views.embeddings[{v}]") for v, z in enumerate((z1, z2))]
        byol = (4 + 2 * negative_cosine(preds[0], t2) + 2 * negative_cosine(preds[1], t1)) / 2
        b = z1.shape[0]
        pool, offset = t1, 0
        if resolve_gather(self.gather):
            pool, offset = gather_no_grad(t1.detach().contiguous()), rank() * b
        k = min(self.k, pool.shape[0] - 1)
        if k < 1:
            raise ShapeError(f"{owner}: mining a neighbour needs a batch of at least 2, got "
                             f"Views.embeddings of {pool.shape[0]} row")
        # drawn for the global batch, so ranks seeded alike draw as one process
        pick = torch.randint(k, (pool.shape[0],), device=z1.device)[offset:offset + b]
        rows = torch.arange(b, device=z1.device) + offset
        j = mine_neighbours(z1, pool, k, rows, pick)
        with torch.no_grad():
            target_m = self.target_projector_m(pool[j].to(z1.dtype), "the mined views")
        pred_m = self.predictor_m(self.projector_m(z1, "Views.embeddings[0]"), "the mined views")
        mined = 2 + 2 * negative_cosine(pred_m, target_m)
        w = self.mined_loss_weight
        per_sample = byol / (1 + w) + w / (1 + w) * mined
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"byol": byol.detach().mean(), "mined": mined.detach().mean()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of ``[B, dim]`` projections and the teacher's."""
        return teacher_target_example(batch_size, self.predictor.dim, generator)


CARD = Card(
    name="myow", kind="objective",
    title="Mine Your Own vieW: Self-Supervised Learning Through Across-Sample Prediction",
    paper="arXiv:2102.10106",
    summary="BYOL plus a second prediction task: each sample's online projection predicts the "
            "target projection of a neighbour mined among the other samples of the batch.",
    formula="j(i) ~ U(kNN_k(z_1i; {z'_1j, j != i}, 2 - 2cos)); "
            "L_i = 1/(1+w) * 1/2 sum_{v!=u} (2 - 2cos(q(z_vi), sg(z'_ui))) "
            "+ w/(1+w) * (2 - 2cos(q_m(r(z_1i)), sg(r'(z'_1j(i))))), w: 0 -> max_weight linear",
    left_out="Mining is in the first projection space (the ema teacher gives projections, not "
             "the encoder's representation the authors mine in) among the other samples of the "
             "(global) batch rather than a separate pool loader, with the first view as the "
             "anchor view (the authors' view3 with its own transform is not drawn); k = 4 is the "
             "authors' trainer default (capped at B - 1). The second projector's momentum copy "
             "is the objective's (a cosine schedule like the ema teacher's). The two BYOL "
             "directions are averaged as in the authors' symmetric loss. The mining is a "
             "function of the objective, not a registered sampler: the framework's pair "
             "samplers feed contrastive objectives, and MYOW's mined views feed a prediction.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MYOW, card=CARD)
