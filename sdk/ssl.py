"""Shared machinery of the non-contrastive self-supervised objectives.

* **Redundancy reduction** (Barlow Twins, and the methods built on its cross-correlation):
  :func:`batch_standardize`, :func:`cross_correlation`, :func:`off_diagonal_sq_sum`.
* **Variance / invariance / covariance** (VICReg and its relatives): :func:`invariance_term`,
  :func:`variance_term`, :func:`covariance_term`.
* **Optimal-transport codes** (SwAV): :func:`sinkhorn`, equipartition over the global batch.
* **Self-distillation** (DINO): :class:`Center` (the teacher's output centre, an EMA buffer)
  and :func:`teacher_temperature` (the teacher temperature's linear warm-up).
* **Teachers' outputs** (BYOL, DINO): :func:`check_teacher` reads ``Views.extras["teacher"]``.
* **Predictive stop-gradient losses** (BYOL, SimSiam): :class:`Predictor` (the MLP on the
  online branch, owned by the objective) and :func:`negative_cosine`.

Everything is computed in at least float32 (:func:`at_least_float32`: bfloat16 / float16
inputs are upcast, float64 stays float64), so low-precision embeddings do not lose the
statistics of the batch. Nothing here reads tensor values on the host.

Zbontar et al., "Barlow Twins", ICML 2021; Bardes et al., "VICReg", ICLR 2022; Caron et al.,
"Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV), NeurIPS
2020; Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV
2021; Grill et al., "Bootstrap Your Own Latent" (BYOL), NeurIPS 2020; Chen & He, "Exploring
Simple Siamese Representation Learning" (SimSiam), CVPR 2021.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdk import keys
from sdk.distributed import gather_no_grad, rank, sum_over_ranks, world_size
from sdk.errors import ShapeError
from sdk.layers import mlp_layers
from sdk.state import ResizableBuffers
from sdk.types import Batch, Views


def at_least_float32(z: Tensor) -> Tensor:
    """``z`` in float32 when it is of lower precision (bfloat16, float16); else unchanged."""
    return z.float() if z.is_floating_point() and z.element_size() < 4 else z


# redundancy reduction (Barlow Twins) ---------------------------------------------------------


def batch_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """``(z - mean) / sqrt(var + eps)`` along the batch with the biased variance (BatchNorm1d
    without affine parameters, in training mode)."""
    z = at_least_float32(z)
    if z.shape[0] > 1:  # torch's batch-norm kernel refuses a single sample
        return F.batch_norm(z, None, None, training=True, eps=eps)
    return z - z.mean(dim=0)  # one sample standardises to 0 (its variance is 0)


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """``C = BN(z1)^T BN(z2) / N`` ``[D, D]``: the cross-correlation of the batch-standardised
    embeddings of two views ``[N, D]`` (Barlow Twins, eq. 2)."""
    return batch_standardize(z1, eps).T @ batch_standardize(z2, eps) / z1.shape[0]


def off_diagonal_sq_sum(c: Tensor) -> Tensor:
    """``sum_{i != j} c_ij^2`` of a square matrix, without materialising a mask (nor the
    squares: the norm reduces in one pass)."""
    return torch.linalg.vector_norm(c).square() - torch.diagonal(c).square().sum()


# variance / invariance / covariance (VICReg) ---------------------------------------------------


def invariance_term(z1: Tensor, z2: Tensor) -> Tensor:
    """``s(Z, Z') = 1/(N D) sum_i ||z_i - z'_i||^2`` (mean squared error)."""
    return F.mse_loss(at_least_float32(z1), at_least_float32(z2))


def variance_term(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """``v(Z) = 1/D sum_j max(0, gamma - sqrt(Var(z^j) + eps))`` with the unbiased variance over
    the batch (a hinge on each dimension's standard deviation); needs ``N >= 2``."""
    std = torch.sqrt(at_least_float32(z).var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def covariance_term(z: Tensor) -> Tensor:
    """``c(Z) = 1/D sum_{i != j} C(Z)_ij^2``, ``C(Z) = (Z - mean)^T (Z - mean) / (N - 1)``;
    needs ``N >= 2``."""
    z = at_least_float32(z)
    n, d = z.shape
    z = z - z.mean(dim=0)
    return off_diagonal_sq_sum(z.T @ z / (n - 1)) / d


# optimal-transport codes (SwAV) --------------------------------------------------------------


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, eps: float = 0.05, *,
             gather: bool = False, bound: float | None = None) -> Tensor:
    """Soft codes ``Q`` ``[B, K]`` of ``B`` samples to ``K`` prototypes from their scores
    ``[B, K]`` (SwAV, eq. 3 and its appendix): ``Q = exp(scores / eps)`` normalised in turn so
    that every prototype receives ``1/K`` of the mass and every sample ``1/B``, ``iterations``
    times; rows are returned summing to one. No gradient.

    Computed in at least float32 and in the log domain (the same iterates, as
    ``log Q``), so no scale of scores overflows or underflows a whole row or column. ``gather``:
    under DDP the equipartition is over the batch of every rank (the global batch): the scores
    are gathered, ``Q`` is computed on them and this rank's rows are returned (every rank must
    hold the same number of rows).

    ``bound``: the caller's promise that ``|scores| <= bound`` (SwAV's scores are cosines:
    1). When ``2 * bound / eps`` is at most 80, no entry of ``exp((scores - max) / eps)``
    underflows float32, and the same iterates are computed on ``Q`` itself (sums instead of
    log-sum-exps: about a third of the work)."""
    local = scores.shape[0]
    if gather and world_size() > 1:
        scores = gather_no_grad(scores)
    if bound is not None and 2 * bound / eps <= _SAFE_EXPONENT:
        return _sinkhorn_scaled(at_least_float32(scores.detach()), iterations, eps, local, gather)
    log_q = at_least_float32(scores.detach()) / eps
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)  # Q / sum(Q)
    b = log_q.shape[0]
    log_b = math.log(b)
    for _ in range(iterations):  # the paper's 1/K per prototype: cancelled by the next step
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)  # prototypes: equal mass
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + log_b)  # samples: 1/B
    q = torch.exp(log_q + log_b)
    if gather and world_size() > 1:
        q = q[rank() * local:(rank() + 1) * local]
    return q


_SAFE_EXPONENT = 80.0  # exp(-80) ~ 1.8e-35 is a normal float32 (the smallest is ~1.2e-38)


def _sinkhorn_scaled(scores: Tensor, iterations: int, eps: float, local: int,
                     gather: bool) -> Tensor:
    """:func:`sinkhorn`'s iterates on ``Q`` (scores known to be bounded)."""
    q = torch.exp((scores - scores.max()) / eps)  # a common factor: it cancels below
    b = q.shape[0]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=0, keepdim=True)
        q = q / (q.sum(dim=1, keepdim=True) * b)
    q = q * b
    if gather and world_size() > 1:
        q = q[rank() * local:(rank() + 1) * local]
    return q


# self-distillation (DINO) --------------------------------------------------------------------


class Center(ResizableBuffers, nn.Module):
    """The centre ``c`` ``[K]`` subtracted from a teacher's outputs (DINO, eq. 4):
    ``c <- m c + (1 - m) mean(t)`` after every training step, over the teacher's outputs of the
    global batch (under DDP the mean is all-reduced, as the authors do).

    The buffer ``center`` starts empty and takes the width of the first outputs it sees (zeros,
    as in the paper), so the owner need not know the head's width; it is checkpointed with the
    owner's ``state_dict``."""

    resizable_buffers: ClassVar[tuple[str, ...]] = ("center",)

    def __init__(self, momentum: float = 0.9, owner: str = "center"):
        super().__init__()
        self.momentum, self.owner = momentum, owner
        self.register_buffer("center", torch.zeros(0))

    def check(self, width: int) -> None:
        """Raise :class:`sdk.ShapeError` when the centre has a width other than ``width``."""
        have = self.center.shape[0]
        if have and have != width:
            raise ShapeError(f"{self.owner}: the teacher's outputs have {width} dimensions, but the "
                             f"centre (from earlier batches or a checkpoint) has {have}")

    def forward(self, t: Tensor) -> Tensor:
        """``t - c`` (``t`` ``[..., K]``; the centre is zero until the first update)."""
        self.check(t.shape[-1])
        return t - self.center.to(t.dtype) if self.center.numel() else t

    @torch.no_grad()
    def update(self, t: Tensor, *, all_reduce: bool = True) -> None:
        """One EMA step towards the mean of ``t`` ``[..., K]`` (all leading dimensions are
        averaged); ``all_reduce``: over every rank's ``t`` under DDP (False: this rank's only,
        e.g. when ``t`` was gathered already)."""
        t = at_least_float32(t.detach()).reshape(-1, t.shape[-1])
        self.check(t.shape[-1])
        total, count = t.sum(dim=0), t.new_tensor(float(t.shape[0]))
        if all_reduce and world_size() > 1:
            total, count = sum_over_ranks(total), sum_over_ranks(count)
        mean = total / count
        if not self.center.numel():
            self.center = torch.zeros_like(mean, dtype=self.center.dtype)
        self.center.mul_(self.momentum).add_(mean.to(self.center.dtype), alpha=1 - self.momentum)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float | None,
                        temp: float) -> float:
    """The teacher temperature at optimizer step ``step``: linear from ``warmup_temp`` to
    ``temp`` over ``warmup_steps`` steps, then ``temp`` (DINO: 0.04 to 0.07 over the first 30
    epochs); ``temp`` throughout when there is no warm-up."""
    if warmup_temp is None or warmup_steps <= 0 or step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


# teachers' outputs (BYOL, DINO) -------------------------------------------------------------


def check_teacher(owner: str, views: Views, count: int | None = None) -> tuple[torch.Tensor, ...]:
    """The teacher's outputs ``Views.extras[keys.TEACHER]``: a tuple of at least ``count`` (all
    views by default) floating ``[B, D]`` tensors of the embeddings' batch size and width, else
    :class:`sdk.ShapeError` naming ``owner``."""
    teacher = views.extras[keys.TEACHER]
    need = views.n_views if count is None else count
    if not isinstance(teacher, (tuple, list)) or len(teacher) < need:
        got = len(teacher) if isinstance(teacher, (tuple, list)) else type(teacher).__name__
        raise ShapeError(f"{owner}: extras[{keys.TEACHER!r}] must hold the teacher's output on each "
                         f"of {need} views, got {got}")
    want = tuple(views.embeddings[0].shape)
    for i, t in enumerate(teacher[:need]):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != want:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeError(f"{owner}: extras[{keys.TEACHER!r}][{i}] must be floating {list(want)} "
                             f"(as the embeddings), got {shape}")
    return tuple(teacher[:need])


# predictive stop-gradient losses (BYOL, SimSiam) ----------------------------------------------


def negative_cosine(prediction: Tensor, target: Tensor, *, stop_gradient: bool = True) -> Tensor:
    """``-cos(p_i, sg(z_i))`` per sample ``[B]`` (SimSiam's ``D``; BYOL's loss is ``2 + 2 D``);
    ``stop_gradient``: the target is detached, the stop-gradient both methods rely on."""
    if stop_gradient:
        target = target.detach()
    p, z = at_least_float32(prediction), at_least_float32(target)
    return -F.cosine_similarity(p, z.to(p.dtype), dim=-1, eps=1e-8)


class Predictor(nn.Module):
    """The prediction MLP ``q`` of BYOL and SimSiam: ``Linear(dim, hidden_dim) -> BN -> ReLU ->
    Linear(hidden_dim, dim)``, no batch norm at its output (BYOL: 256 -> 4096 -> 256; SimSiam:
    2048 -> 512 -> 2048, its bottleneck). Owned by the objective, so the Trainer optimises it
    and the EMA teacher, a copy of the encoder, has none (BYOL's target network has no
    predictor).

    ``z`` must be floating ``[B, dim]`` and of more than one row in training mode (batch norm),
    else :class:`sdk.ShapeError` names ``owner``; it is cast to the parameters' dtype (outside
    autocast), so bfloat16 or float64 embeddings go through a float32 predictor."""

    def __init__(self, dim: int, hidden_dim: int, owner: str = "predictor"):
        super().__init__()
        self.dim, self.owner = dim, owner
        self.net = mlp_layers([dim, hidden_dim, dim])

    def forward(self, z: Tensor, field: str = "embeddings") -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim or not z.is_floating_point():
            raise ShapeError(f"{self.owner}: {field} must be floating [B, {self.dim}] (the "
                             f"predictor's dim), got {z.dtype} {list(z.shape)}")
        if self.training and z.shape[0] < 2:
            raise ShapeError(f"{self.owner}: {field} has {z.shape[0]} row, but the predictor's "
                             "batch norm in training mode needs a batch of at least 2")
        dtype = self.net[0].weight.dtype
        if not torch.is_autocast_enabled(z.device.type):
            z = z.to(dtype)
        return self.net(z)


class LinearPredictor(Predictor):
    """A linear predictor ``p = W_p z``, ``W_p`` ``[dim, dim]`` without bias or normalisation
    (Tian, Chen & Ganguli, "Understanding Self-supervised Learning Dynamics without Contrastive
    Pairs", ICML 2021: the predictor DirectPred sets from the embeddings' correlation instead of
    training it). The same checks as :class:`Predictor`; any batch size."""

    def __init__(self, dim: int, owner: str = "predictor"):
        nn.Module.__init__(self)
        self.dim, self.owner = dim, owner
        self.net = nn.Sequential(nn.Linear(dim, dim, bias=False))

    @property
    def weight(self) -> Tensor:
        """``W_p`` ``[dim, dim]`` (the prediction is ``z @ W_p^T``)."""
        return self.net[0].weight

    def forward(self, z: Tensor, field: str = "embeddings") -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim or not z.is_floating_point():
            raise ShapeError(f"{self.owner}: {field} must be floating [B, {self.dim}] (the "
                             f"predictor's dim), got {z.dtype} {list(z.shape)}")
        if not torch.is_autocast_enabled(z.device.type):
            z = z.to(self.weight.dtype)
        return self.net(z)


def teacher_target_example(batch_size: int, dim: int,
                           generator: torch.Generator) -> tuple[Views, Batch]:
    """Example inputs of an objective that predicts a momentum teacher's projections (BYOL and
    the methods built on it): two views of ``[B, dim]`` online projections and the teacher's."""
    z = tuple(torch.randn(batch_size, dim, generator=generator).requires_grad_() for _ in range(2))
    t = tuple(torch.randn(batch_size, dim, generator=generator) for _ in range(2))
    return Views(embeddings=z, extras={keys.TEACHER: t}), Batch()
