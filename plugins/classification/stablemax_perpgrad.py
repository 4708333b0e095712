"""StableMax cross-entropy and the ⊥Grad gradient projection.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025
(arXiv:2501.04697): StableMax (Sec. 4) replaces ``exp`` in the softmax by ``s``, linear for
``x >= 0`` and ``1 / (1 - x)`` below, so the loss does not collapse to exactly 0 in floating
point ("Softmax Collapse"); ⊥Grad (Sec. 5) removes from the gradient its component along the
weights, the naive-loss-minimisation direction that only scales the logits. The projection is
per parameter tensor and rescaled to the gradient's norm, as in the authors' ``orthograd.py``
(github.com/LucasPrietoAl/grokking-at-the-edge-of-numerical-stability).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch.autograd.function import once_differentiable

from sdk import classification as cls
from sdk.card import Card
from sdk.constraints import one_of
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, Input, Objective
from sdk.types import Batch, Loss, Views

TINY = 1e-30
"""Added to ``<w, w>`` and ``||g_perp||`` as in the authors' code (a zero tensor keeps its gradient)."""


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """``s(x) = x + 1`` for ``x >= 0``, ``1 / (1 - x)`` for ``x < 0``: positive, C^1 at 0 (each
    branch clamped to its side, so the unused one has a finite gradient)."""
    return torch.where(x >= 0, x.clamp_min(0) + 1, 1 / (1 - x.clamp_max(0)))


def log_stablemax(logits: torch.Tensor) -> torch.Tensor:
    """``log(s(x_k) / sum_j s(x_j))`` [B, C], in float32 or better."""
    s = stablemax_s(cls.upcast(logits))
    return s.log() - s.sum(-1, keepdim=True).log()


class _StableMaxNLL(torch.autograd.Function):
    """``-log StableMax(z)_y`` [B] for class ids with one saved ``[B, C]`` tensor: with
    ``m = min(z, 0)`` it keeps ``n = -1 / (1 - m) = 1 / (m - 1)``, so that ``s(z) = max(z, 0) - n``,
    ``S = sum_j s(z_j)`` and ``s'(z) = n^2``; the gradient is in closed form,
    ``dL/dz_k = s'(z_k) / S - [k = y] s'(z_y) / s(z_y)``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n = z.clamp_max(0).sub_(1).reciprocal_()
        total = z.clamp_min(0).sum(-1) - n.sum(-1)
        n_y = n.gather(-1, ids[:, None]).squeeze(-1)
        s_y = z.gather(-1, ids[:, None]).squeeze(-1).clamp_min(0) - n_y
        ctx.save_for_backward(n, ids, total, n_y, s_y)
        return total.log() - s_y.log()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        n, ids, total, n_y, s_y = ctx.saved_tensors
        d = torch.mul(n, (grad / total)[:, None]).mul_(n)
        d.scatter_add_(-1, ids[:, None], (-grad * n_y * n_y / s_y)[:, None])
        return d, None


def stablemax_cross_entropy(logits: torch.Tensor, t: cls.Targets) -> torch.Tensor:
    """Per-sample ``-sum_c q_c log StableMax(z)_c`` (``-log StableMax(z)_y`` for ids, by a fused
    autograd function)."""
    if t.ids is not None:
        return _StableMaxNLL.apply(cls.upcast(logits), t.ids)
    return -cls.pick(log_stablemax(logits), t)


def softmax_collapse(logits: torch.Tensor, t: cls.Targets) -> torch.Tensor:
    """[B] booleans: whether the float32 softmax cross-entropy of a sample is exactly 0 (its
    gradient vanishes in floating point: the paper's Softmax Collapse)."""
    with torch.no_grad():
        return cls.target_log_prob(logits.float(), t) == 0


class StableMaxCrossEntropy(Objective):
    """Cross-entropy through StableMax on ``Views.logits`` against class ids or soft labels;
    ``logs["softmax_collapse"]``: the share of (counted) samples whose float32 softmax
    cross-entropy would be exactly 0."""

    requires = {"logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.SOFT_LABELS})
    batch_coupled = False

    def __init__(self, ignore_index: int | None = None, log_collapse: bool = True):
        super().__init__()
        self.ignore_index, self.log_collapse = ignore_index, log_collapse

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.logits
        t = cls.targets("stablemax_perpgrad", z, batch.targets, ignore_index=self.ignore_index)
        loss = cls.reduce(stablemax_cross_entropy(z, t), t)
        if not self.log_collapse:
            return loss
        collapsed = softmax_collapse(z.detach(), t).float()
        if t.valid is not None:
            share = (collapsed * t.valid).sum() / t.valid.sum().clamp_min(1)
        else:
            share = collapsed.mean()
        return Loss(value=loss.value, per_sample=loss.per_sample, logs={"softmax_collapse": share})


def orthogonal_gradients(params: list[torch.Tensor], grads: list[torch.Tensor], *,
                         scope: str = "tensor", rescale: bool = True) -> list[torch.Tensor]:
    """``g_perp = g - (<w, g> / <w, w>) w`` for each parameter tensor ``w`` (``scope="global"``:
    ``w`` and ``g`` the concatenation of all of them); ``rescale``: ``g_perp`` scaled to ``||g||``."""
    w = [p.detach().flatten().to(g.dtype) for p, g in zip(params, grads)]
    g = [q.flatten() for q in grads]
    if scope == "global":
        w, g = [torch.cat(w)], [torch.cat(g)]
    out = []
    for wi, gi in zip(w, g):
        perp = gi - (torch.dot(wi, gi) / (torch.dot(wi, wi) + TINY)) * wi
        if rescale:
            perp = perp * (torch.linalg.vector_norm(gi) / (torch.linalg.vector_norm(perp) + TINY))
        out.append(perp)
    if scope == "global":
        out = list(torch.split(out[0], [q.numel() for q in grads]))
    return [o.view_as(q) for o, q in zip(out, grads)]


class PerpGrad(Callback):
    """⊥Grad: at ``before_optimizer_step``, replaces every gradient of the optimizer's
    parameters by its component orthogonal to the parameter (any optimizer: ⊥AdamW, ⊥SGD)."""

    def __init__(self, scope: Annotated[str, one_of(("tensor", "global"))] = "tensor",
                 rescale: bool = True):
        self.scope, self.rescale = scope, rescale

    def before_optimizer_step(self, state: Any) -> None:
        params = [p for group in state.optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return
        with torch.no_grad():
            new = orthogonal_gradients(params, [p.grad for p in params], scope=self.scope,
                                       rescale=self.rescale)
            for p, g in zip(params, new):
                p.grad.copy_(g)


_TITLE = "Grokking at the Edge of Numerical Stability"

CARD = Card(
    name="stablemax_perpgrad", kind="objective", title=_TITLE, paper="arXiv:2501.04697",
    summary="Cross-entropy through StableMax (a softmax whose exp is replaced by a function "
            "linear above 0 and 1/(1-x) below), which does not collapse to an exact 0 loss in "
            "float32; pair it with the stablemax_perpgrad callback (⊥Grad).",
    formula="s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0); p_k = s(z_k) / sum_j s(z_j); "
            "L = -log p_y (-sum_k q_k log p_k for soft labels)",
    left_out="Computed in float32 (float64 inputs stay float64); the authors' code casts to "
             "float64. ignore_index as in cross_entropy; no class weights. The logged "
             "softmax_collapse share costs one extra fused cross-entropy pass "
             "(log_collapse=False skips it). The paper's transformer/MLP grokking tasks are not "
             "shipped as recipes.",
)

CALLBACK_CARD = Card(
    name="stablemax_perpgrad", kind="callback", title=_TITLE, paper="arXiv:2501.04697",
    summary="⊥Grad: before each optimizer step, removes from each parameter's gradient its "
            "component along the parameter (the direction that only scales the weights) and "
            "rescales it to the original gradient norm.",
    formula="g_perp = g - (<w, g> / (<w, w> + 1e-30)) w; g <- g_perp ||g|| / (||g_perp|| + 1e-30) "
            "(per parameter tensor; scope='global': over all parameters as one vector)",
    left_out="The rescaling to ||g|| is the authors' code's (the paper's equation has the "
             "projection only): rescale=False drops it. scope='global' (the paper's notation, "
             "theta the whole parameter vector) is an option; the default is the code's "
             "per-tensor projection. Applied to every parameter the optimizer holds, biases "
             "included, as the code does.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(StableMaxCrossEntropy, card=CARD)
    registry.add(PerpGrad, card=CALLBACK_CARD)
