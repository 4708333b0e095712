"""Z-loss: a softplus of the target's z-normalised score, invariant to shifting and scaling the logits.

de Brébisson & Vincent, "The Z-loss: a shift and scale invariant classification loss belonging
to the Spherical Family", 2016 (arXiv:1604.08859), eq. 5; a = 1, b = 0 as in the authors'
example code (github.com/pascal20100/factored_output_layer, example/timing_example.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch.autograd.function import once_differentiable

from sdk import classification as cls
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

EPS = 1e-12
"""Added to the standard deviation (as the authors' code does), so a row of equal logits gives 0."""


class _TargetZ(torch.autograd.Function):
    """``z_y = (o_y - mu) / (sigma + eps)`` [B], ``sigma`` the norm of the centred logits ``o - mu``
    over ``sqrt(C)`` (two passes; the centred copy is kept for the backward); the gradient in
    closed form, ``dz_y/do_k = ([k = y] - 1/C) / D - (o_y - mu) (o_k - mu) / (D^2 C sigma)`` with
    ``D = sigma + eps`` (the second term 0 where the variance is clamped), in one ``[B, C]`` tensor."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        c = o.shape[-1]
        mu = o.mean(-1)
        centred = o - mu[:, None]
        var = torch.linalg.vector_norm(centred, dim=-1).square_().div_(c)
        tiny = torch.finfo(o.dtype).tiny
        sigma = var.clamp_min(tiny).sqrt()
        d = sigma + EPS
        u = centred.gather(-1, ids[:, None]).squeeze(-1)
        ctx.save_for_backward(centred, ids, sigma, d, u, var >= tiny)
        return u / d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        centred, ids, sigma, d, u, unclamped = ctx.saved_tensors
        c = centred.shape[-1]
        slope = torch.where(unclamped, -grad * u / (d * d * c * sigma), 0.0)
        out = torch.addcmul((-grad / (c * d))[:, None], centred, slope[:, None])
        return out.scatter_add_(-1, ids[:, None], (grad / d)[:, None]), None


def target_z(logits: torch.Tensor, t: cls.Targets) -> torch.Tensor:
    """``z_y = (o_y - mean(o)) / (std(o) + eps)`` [B], the population standard deviation."""
    return _TargetZ.apply(cls.upcast(logits), t.ids)


def z_loss(logits: torch.Tensor, t: cls.Targets, a: float = 1.0, b: float = 0.0) -> torch.Tensor:
    """Per-sample ``softplus(a (b - z_y)) / a``, ``z`` the z-normalised logits."""
    return F.softplus(a * (b - target_z(logits, t))) / a


class ZLoss(Objective):
    """Z-loss on ``Views.logits`` against class ids: depends on the logits only through their
    mean, standard deviation and the target's logit (a spherical loss)."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = False

    def __init__(self, a: Annotated[float, Gt(0)] = 1.0, b: float = 0.0,
                 ignore_index: int | None = None):
        super().__init__()
        self.a, self.b, self.ignore_index = a, b, ignore_index

    def forward(self, views: Views, batch: Batch) -> Loss:
        t = cls.targets("z_loss", views.logits, batch.targets, soft=False, ignore_index=self.ignore_index)
        return cls.reduce(z_loss(views.logits, t, self.a, self.b), t)


CARD = Card(
    name="z_loss", kind="objective",
    title="The Z-loss: a shift and scale invariant classification loss belonging to the Spherical Family",
    paper="arXiv:1604.08859",
    summary="Softplus of the target's z-normalised logit: invariant to adding a constant to and "
            "positively rescaling the logits.",
    formula="z_k = (o_k - mu) / sigma, mu = mean_k o_k, sigma^2 = mean_k (o_k - mu)^2; "
            "L = softplus(a (b - z_y)) / a",
    left_out="The spherical-family trick that makes training cost independent of the number of "
             "classes (factored output-layer updates) is not implemented: the loss is computed "
             "from the full logits. a and b are the paper's tuned hyperparameters (its values "
             "depend on the task); the defaults a = 1, b = 0 are the authors' example code's. "
             "sigma gets + 1e-12 as in that code. Class-id targets only.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ZLoss, card=CARD)
