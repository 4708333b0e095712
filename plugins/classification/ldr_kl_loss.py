"""LDR-KL: the label-distributionally robust loss with a KL regulariser towards uniform weights.

Zhu, Ying & Yang, "Label Distributionally Robust Losses for Multi-class Classification:
Consistency, Robustness and Adaptivity", ICML 2023 (arXiv:2112.14869); scores normalised and
defaults (lambda = 10, margin 0.1) as in the authors' code (github.com/Optimization-AI/ICML2023_LDR,
loss.py LDRLoss_V1 and experiment.py).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch.autograd.function import once_differentiable

from sdk import classification as cls
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


class _LDRKL(torch.autograd.Function):
    """Per-sample LDR-KL of class ids as ``lam`` times a cross-entropy: with ``g_k = f_k / lam +
    (c / lam) [k != y]``, ``L = lam (logsumexp(g) - g_y - log K)``, computed from ``g - c / lam``
    (the margin subtracted at the target alone, no pass over the row). It keeps ``log softmax(g)``
    (and ``s = softplus(o)`` when normalising, ``f = s / mean(s)``); the gradient in closed
    form, ``dL/df = softmax(g) - onehot(y)``, through ``f`` as
    ``dL/ds_j = (dL/df_j - sum_k dL/df_k s_k / (K mean(s))) / mean(s)`` and ``ds/do = sigmoid(o)``,
    all in the one ``[B, C]`` tensor it returns."""

    @staticmethod
    def forward(ctx, o: torch.Tensor, ids: torch.Tensor, lam: float, margin: float,
                normalize: bool) -> torch.Tensor:
        k = o.shape[-1]
        if normalize:
            s = F.softplus(o)
            mean = s.mean(-1)
            clamped = mean.clamp_min(torch.finfo(s.dtype).tiny)
            g = torch.div(s, clamped[:, None]).div_(lam)
        else:
            s, g = o, o / lam
        # the margin on the target alone, -c/lam: log_softmax is unchanged by a shift per row
        g_y = g.gather(-1, ids[:, None]).sub_(margin / lam)
        log_p = cls.log_softmax_(g.scatter_(-1, ids[:, None], g_y))
        ctx.lam, ctx.normalize = lam, normalize
        if normalize:
            ctx.save_for_backward(log_p, ids, o, s, clamped, mean >= torch.finfo(s.dtype).tiny)
        else:
            ctx.save_for_backward(log_p, ids)
        return -lam * (log_p.gather(-1, ids[:, None]).squeeze(-1) + math.log(k))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_p, ids = ctx.saved_tensors[:2]
        d = torch.softmax(log_p, -1)
        d.scatter_add_(-1, ids[:, None], -torch.ones_like(log_p[:, :1]))  # dL/df (per lam)
        if not ctx.normalize:
            return d.mul_(grad[:, None]), None, None, None, None
        o, s, mean, unclamped = ctx.saved_tensors[2:]
        through_mean = torch.bmm(d[:, None, :], s[:, :, None]).view(-1)
        shift = torch.where(unclamped, grad * through_mean / (o.shape[-1] * mean * mean), 0.0)
        torch.addcmul(-shift[:, None], d, (grad / mean)[:, None], out=d)
        # d * sigmoid(o) in place: softplus's own backward (its threshold 20, as F.softplus)
        torch.ops.aten.softplus_backward.grad_input(d, o, 1.0, 20.0, grad_input=d)
        return d, None, None, None, None


def ldr_kl_loss(logits: torch.Tensor, t: cls.Targets, lam: float = 10.0, margin: float = 0.1,
                normalize: bool = True) -> torch.Tensor:
    """Per-sample ``max_{p in simplex} sum_k p_k (c [k != y] + f_k - f_y) - lam KL(p || 1/K)``
    ``= lam log((1/K) sum_k exp((c [k != y] + f_k - f_y) / lam))``, ``f = softplus(o) /
    mean_k softplus(o_k)`` (``normalize``) or the logits; computed as a cross-entropy of
    ``g = f / lam + (c / lam) [k != y]`` (no ``[B, C]`` margin matrix; exact for small lam)."""
    return _LDRKL.apply(cls.upcast(logits), t.ids, lam, margin, normalize)


class LDRKLLoss(Objective):
    """LDR-KL on ``Views.logits`` against class ids; ``lam -> 0`` is the Crammer-Singer hinge
    ``max_k (c [k != y] + f_k - f_y)``, ``lam -> inf`` the mean of the margins."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = False

    def __init__(self, lam: Annotated[float, Gt(0)] = 10.0, margin: Annotated[float, Ge(0)] = 0.1,
                 normalize: bool = True):
        super().__init__()
        self.lam, self.margin, self.normalize = lam, margin, normalize

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets("ldr_kl_loss", z, batch.targets, soft=False)
        per_sample = ldr_kl_loss(z, t, self.lam, self.margin, self.normalize)
        return Loss(value=per_sample.mean(), per_sample=per_sample)


CARD = Card(
    name="ldr_kl_loss", kind="objective",
    title="Label Distributionally Robust Losses for Multi-class Classification: Consistency, "
          "Robustness and Adaptivity",
    paper="arXiv:2112.14869",
    summary="Worst case over label weights p of the margin-shifted score gaps, regularised by "
            "KL(p || uniform): a log-sum-exp with temperature lambda, robust to label noise.",
    formula="f = softplus(o) / mean(softplus(o)); "
            "L = lambda log((1/K) sum_k exp((c [k != y] + f_k - f_y) / lambda))",
    left_out="The adaptive variant ALDR-KL (a lambda learned per sample from the KL of its "
             "predicted distribution, kept per dataset index) and the top-k variants. The score "
             "normalisation (softplus, divided by the row mean) is the authors' code's; "
             "normalize=False uses the raw logits. Class-id targets only.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LDRKLLoss, card=CARD)
