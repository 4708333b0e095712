"""Data-dependent post-training rounding: every weight is written as an interpolation
``down + x (up - down)`` between its two neighbouring grid points, ``x`` in [0, 1] is optimised
by projected gradient steps to keep the model's output distribution (a KL distillation loss)
while a linear term pushes each ``x`` to the vertex of the hypercube nearest the weight, and the
result is rounded.

Chee, Backurs, Heck, Zhang, Kulkarni, Rothvoss & Gopi, "DiscQuant: A Quantization Method for
Neural Networks Inspired by Discrepancy Theory", COLT 2025 (arXiv:2501.06417), Section 4, as
the authors' code (jerry-chee/DiscQuant: ``quantize_linearlayer_multimode``, ``discq.py``)
implements it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Annotated, Any

import annotated_types
import torch
from torch import Tensor, nn

from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import RequirementError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.quantization import Grid


def kl_to_original(target_logits: Tensor, logits: Tensor) -> Tensor:
    """``sum p (log p - log q) / N`` with ``p`` the original model's softmax and ``q`` the
    interpolated model's, over rows ``[N, C]``."""
    p = target_logits.float().softmax(-1)
    return (p * (target_logits.float().log_softmax(-1) - logits.float().log_softmax(-1))).sum() / p.shape[0]


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """The rate multiplier of the authors' runs: linear warm-up, then cosine to 0."""
    if step < warmup:
        return step / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def discquant_round(model: nn.Module, batches: Iterable[Tensor], *, bits: int = 3,
                    group_size: int | None = 32, steps: int = 1024, lr: float = 0.1,
                    rho: float = 200.0, clamp: float = 1.0, warmup: int = 128, init: str = "rand",
                    min_dim: int = 2, seed: int = 0) -> dict[str, Grid]:
    """Round ``model``'s parameters of at least ``min_dim`` dimensions onto asymmetric
    ``bits``-bit grids (per group of ``group_size`` entries of a channel when it divides the
    channel, else per channel), in place; returns the grids by parameter name.

    With ``y = (w - down) / (up - down)`` (0.5 where the two coincide), ``c = 2 y - 1`` and
    ``delta^2`` the mean over the layers of ``12 mean((RTN(w) - w)^2)``: for ``steps`` batches of
    ``batches`` (cycled), ``L = KL(p_w || p_{w(x)}) / delta^2``, ``x.grad = -c + clamp(rho dL/dx,
    -clamp, clamp)``, an AdamW step (rate ``lr`` with warm-up and cosine decay), then ``x``
    clamped to [0, 1]; finally ``w = down + round(x) (up - down)``. ``init``: ``"rand"`` (x
    uniform, the authors' default) or ``"orig"`` (x = y)."""
    named = {n: p for n, p in model.named_parameters() if p.dim() >= min_dim}
    if not named:
        raise RequirementError(f"discquant_rounding: the model has no parameter with at least "
                               f"{min_dim} dimensions to quantise")
    gen = torch.Generator().manual_seed(seed)
    grids, downs, gaps, xs, cs, errors = {}, {}, {}, {}, {}, []
    for name, p in named.items():
        w = p.detach()
        size = w[0].numel()
        grid = Grid.fit(w, bits, symmetric=False,
                        group_size=group_size if group_size and size % group_size == 0 else None)
        down, up = grid.neighbours(w)
        gap = up - down
        y = torch.where(gap == 0, torch.full_like(w, 0.5), (w - down) / torch.where(gap == 0, 1, gap))
        errors.append(12 * ((down + torch.round(y) * gap - w) ** 2).mean())
        start = torch.rand(w.shape, generator=gen).to(w) if init == "rand" else y.clone()
        grids[name], downs[name], gaps[name], cs[name] = grid, down, gap, 2 * y - 1
        xs[name] = start.requires_grad_()
    delta2 = torch.stack(errors).mean().clamp_min(torch.finfo(torch.float32).tiny)
    optimizer = torch.optim.AdamW(list(xs.values()), lr=lr, betas=(0.9, 0.999))
    was_training = model.training
    model.eval()
    for step, x_in in enumerate(itertools.islice(itertools.cycle(batches), steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, warmup)
        with torch.no_grad():
            target = model(x_in)
        weights = {n: downs[n] + xs[n] * gaps[n] for n in named}
        loss = kl_to_original(target, torch.func.functional_call(model, weights, (x_in,))) / delta2
        grads = torch.autograd.grad(loss, list(xs.values()))
        for (name, x), g in zip(xs.items(), grads):
            x.grad = -cs[name] + (rho * g).clamp(-clamp, clamp)
        optimizer.step()
        with torch.no_grad():
            for x in xs.values():
                x.clamp_(0, 1)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(downs[name] + torch.round(xs[name].detach()) * gaps[name])
    model.train(was_training)
    return grids


def inputs_of(loader: Iterable[Any], device: torch.device) -> list[Tensor]:
    """The input tensors of a loader's items (a tensor, or the first entry of a tuple / list)."""
    out = []
    for item in loader:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise RequirementError(f"discquant_rounding: calibration items must be tensors or "
                                   f"(x, ...) tuples, got {type(x).__name__}")
        out.append(x.to(device))
    return out


class DiscQuantRounding(Callback):
    """At ``on_fit_end``: :func:`discquant_round` the trained encoder in place, calibrated on the
    training loader's inputs (the KL to the encoder's own outputs before rounding); ``grids``
    then holds each quantised parameter's grid (every such weight is exactly on it)."""

    def __init__(self, bits: Annotated[int, annotated_types.Interval(ge=2, le=8)] = 3,
                 group_size: Annotated[int, annotated_types.Ge(1)] | None = 32,
                 steps: Annotated[int, annotated_types.Ge(0)] = 1024,
                 lr: Annotated[float, annotated_types.Gt(0)] = 0.1,
                 rho: Annotated[float, annotated_types.Ge(0)] = 200.0,
                 clamp: Annotated[float, annotated_types.Gt(0)] = 1.0,
                 warmup: Annotated[int, annotated_types.Ge(0)] = 128,
                 init: Annotated[str, one_of(("rand", "orig"))] = "rand",
                 min_dim: Annotated[int, annotated_types.Ge(1)] = 2, seed: int = 0):
        self.params = dict(bits=bits, group_size=group_size, steps=steps, lr=lr, rho=rho,
                           clamp=clamp, warmup=warmup, init=init, min_dim=min_dim, seed=seed)
        self.grids: dict[str, Grid] = {}

    def on_fit_end(self, state: Any) -> None:
        model = state.trainer.encoder
        device = next(model.parameters()).device
        self.grids = discquant_round(model, inputs_of(state.trainer.train_loader, device), **self.params)


CARD = Card(
    name="discquant_rounding", kind="callback",
    title="DiscQuant: A Quantization Method for Neural Networks Inspired by Discrepancy Theory",
    paper="arXiv:2501.06417",
    summary="Post-training rounding: interpolation variables between each weight's two grid "
            "points, optimised to keep the model's outputs (KL) while a linear term drives them "
            "to a vertex, then rounded; better than round-to-nearest at low bits.",
    formula="w(x) = down + x (up - down), x in [0,1]^n; y = (w - down)/(up - down), c = 2y - 1; "
            "min_x KL(p_w || p_{w(x)}) / delta^2 - <c, x> by AdamW with x.grad = -c + "
            "clamp(rho dKL/dx, -clamp, clamp), then project to [0, 1]; w_q = down + round(x)(up - down)",
    left_out="The intermediate-representation and ground-truth loss terms (weights 0 in the "
             "authors' runs), QuIP's random Hadamard incoherence processing, and LLM-scale data: "
             "calibration is the training loader's inputs, KL to the encoder's own outputs. "
             "Defaults follow the authors' script (3 bits, groups of 32, lr 0.1, rho 200, clamp "
             "1, AdamW, 128 warm-up steps, x initialised uniformly), with 1024 calibration steps.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DiscQuantRounding, card=CARD)
