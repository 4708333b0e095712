"""Centred alignment of the empirical neural tangent kernel with the label kernel.

Kumar, Bordelon, Gershman, Pehlevan, "Grokking as the Transition from Lazy to Rich Training
Dynamics", ICLR 2024 (arXiv:2310.06110): grokking arises when the top eigenvectors of the
initial NTK are misaligned with the labels and the network only later learns features; the
paper tracks this with the centred kernel alignment (CKA) between the empirical NTK
``K_ij = <d f(x_i)/d theta, d f(x_j)/d theta>`` and ``y y^T``, which rises at the transition to
rich training and stays put in the lazy regime. The centred alignment is that of Cortes, Mohri,
Rostamizadeh (2012): ``A(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)``, ``H = I - 11^T / n``.
The metric measures it from per-sample Jacobians; the callback records it during training.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, Metric

_NAME = "ntk_alignment_grokking"
_STAT = torch.float64


def per_sample_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """``J [N, *out, P]``: the gradient of each output of ``model`` at each row of ``x`` with
    respect to its trainable parameters (flattened and concatenated in ``named_parameters``
    order), by ``torch.func.vmap(jacrev(.))`` over the rows. ``model`` is run as given on one
    row at a time (put batch-coupled layers such as batch norm in eval mode)."""
    if x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(f"{_NAME}: x must be [N, ...] with N >= 1, got {list(x.shape)}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ShapeError(f"{_NAME}: the model has no trainable parameters")
    buffers = dict(model.named_buffers())

    def f(p: dict[str, Tensor], row: Tensor) -> Tensor:
        return functional_call(model, (p, buffers), (row[None],)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    flat = [j.reshape(*j.shape[:j.dim() - params[name].dim()], -1) for name, j in jac.items()]
    return torch.cat(flat, dim=-1)                           # [N, *out, P]


def ntk_from_jacobian(jacobian: Tensor) -> Tensor:
    """``K_ij = sum_{c, p} J_icp J_jcp`` (float64 ``[N, N]``): the empirical NTK, traced over the
    outputs ``c`` when there are several."""
    j = jacobian.to(_STAT).reshape(jacobian.shape[0], -1)
    return j @ j.T


def empirical_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """The empirical NTK ``K = J J^T`` of ``model`` on the rows of ``x`` (float64 ``[N, N]``)."""
    return ntk_from_jacobian(per_sample_jacobian(model, x))


def _centre(k: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 11^T / n``: rows and columns of ``K`` minus their means."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def centered_kernel_alignment(kernel: Tensor, target_kernel: Tensor) -> Tensor:
    """``A(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` (a float64 scalar tensor): 1 when the
    centred kernels are proportional, unchanged by scaling either kernel or by adding a
    constant to every entry; NaN when a centred kernel is zero."""
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or target_kernel.shape != kernel.shape:
        raise ShapeError(f"{_NAME}: kernels must be square and of one shape, got "
                         f"{list(kernel.shape)} and {list(target_kernel.shape)}")
    kc, lc = _centre(kernel.to(_STAT)), _centre(target_kernel.to(_STAT))
    return (kc * lc).sum() / (torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc))


def _check(jacobian: Tensor, targets: Tensor) -> None:
    if jacobian.dim() < 2 or not jacobian.is_floating_point():
        raise ShapeError(f"{_NAME}: jacobian must be floating [N, P] or [N, C, P] (per-sample "
                         f"parameter gradients), got {jacobian.dtype} {list(jacobian.shape)}")
    if targets.shape != jacobian.shape[:-1] or not targets.is_floating_point():
        raise ShapeError(f"{_NAME}: targets must be floating {list(jacobian.shape[:-1])} (one per "
                         f"output of jacobian {list(jacobian.shape)}), got {targets.dtype} "
                         f"{list(targets.shape)}")


def ntk_target_alignment(jacobian: Tensor, targets: Tensor) -> Tensor:
    """``A(J J^T, Y Y^T)``: the centred alignment of the empirical NTK of ``jacobian``
    (``[N, P]`` for a scalar output, ``[N, C, P]`` for ``C`` outputs) with the label kernel of
    ``targets`` (``[N]`` or ``[N, C]``)."""
    _check(jacobian, targets)
    y = targets.to(_STAT).reshape(targets.shape[0], -1)
    return centered_kernel_alignment(ntk_from_jacobian(jacobian), y @ y.T)


def _example(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments for the conformance kit: per-sample gradients ``[B, 6]`` and scalar
    targets ``[B]`` that depend on them."""
    j = torch.randn(batch_size, 6, generator=generator)
    return j, j[:, 0] + 0.5 * torch.randn(batch_size, generator=generator)


class NTKAlignment(Metric):
    """``update(jacobian, targets)`` keeps the per-sample parameter gradients of a probe set
    (:func:`per_sample_jacobian`) and its targets; ``compute()`` gives ``alignment``, the
    centred alignment of their empirical NTK with ``y y^T`` over everything updated (every
    pair of rows is needed)."""

    example_inputs = staticmethod(_example)

    def __init__(self) -> None:
        self.reset()

    def update(self, jacobian: Tensor, targets: Tensor) -> None:
        _check(jacobian, targets)
        if self._j and jacobian.shape[1:] != self._j[0].shape[1:]:
            raise ShapeError(f"{_NAME}: jacobian rows must stay {list(self._j[0].shape[1:])}, "
                             f"got {list(jacobian.shape)}")
        self._j.append(jacobian.detach().to(_STAT))
        self._y.append(targets.detach().to(_STAT).to(jacobian.device))

    def compute(self) -> dict[str, float]:
        if sum(j.shape[0] for j in self._j) < 2:
            return {"alignment": math.nan}
        device = self._j[0].device
        j = torch.cat([r.to(device) for r in self._j])
        y = torch.cat([r.to(device) for r in self._y])
        return {"alignment": float(ntk_target_alignment(j, y))}

    def reset(self) -> None:
        self._j: list[Tensor] = []
        self._y: list[Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"jacobian": torch.cat(self._j), "targets": torch.cat(self._y)} if self._j else {}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "jacobian" in state:
            self._j = [torch.as_tensor(state["jacobian"]).clone()]
            self._y = [torch.as_tensor(state["targets"]).clone()]


def _as_targets(targets: Tensor, outputs: Tensor) -> Tensor:
    """Float targets shaped like the outputs ``[N, *out]``: class ids ``[N]`` become one-hot rows
    of the outputs' width ``[N, C]``; float targets of as many entries per row are reshaped."""
    if targets.is_floating_point():
        if targets[0].numel() != outputs[0].numel():
            raise ShapeError(f"callback '{_NAME}': float targets {list(targets.shape)} need one "
                             f"value per output, outputs are {list(outputs.shape[1:])} per row")
        return targets.reshape(targets.shape[0], *outputs.shape[1:])
    if outputs.dim() != 2:
        raise ShapeError(f"callback '{_NAME}': class-id targets need [N, C] outputs, got "
                         f"{list(outputs.shape)}")
    return F.one_hot(targets.long(), outputs.shape[1]).to(outputs.dtype)


class NTKAlignmentTracker(Callback):
    """Records the NTK-label alignment over training on a fixed probe set: the first
    ``probe_size`` training rows seen (``state.x`` and ``state.batch.targets`` at
    ``after_forward``; all of the first epoch's rows when there are fewer). Once the probe set
    is complete, and then every ``every`` optimizer steps, the alignment of the model's
    empirical NTK on it (model in eval mode for the Jacobian) is appended to :attr:`history`
    as ``(step, alignment)``. Probe set and history are checkpointed."""

    def __init__(self, probe_size: Annotated[int, Ge(2)] = 256, every: Annotated[int, Ge(1)] = 100):
        self.probe_size, self.every = probe_size, every
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []
        self._closed = False
        self.history: list[tuple[int, float]] = []

    def _ready(self) -> bool:
        return self._closed or sum(r.shape[0] for r in self._x) >= self.probe_size

    def after_forward(self, state: Any) -> None:
        if self._ready():
            return
        targets = state.batch.targets if state.batch is not None else None
        if targets is None:
            raise ShapeError(f"callback '{_NAME}': the batch has no targets (Batch.targets) to "
                             "build the label kernel from")
        need = self.probe_size - sum(r.shape[0] for r in self._x)
        self._x.append(state.x[:need].detach().clone())
        self._y.append(targets[:need].detach().clone())
        if self._ready():
            self._record(state)

    def on_epoch_end(self, state: Any) -> None:
        if not self._ready() and self._x:              # fewer training rows than probe_size
            self._closed = True
            self._record(state)

    def after_optimizer_step(self, state: Any) -> None:
        if self._ready() and state.step % self.every == 0:
            self._record(state)

    def _record(self, state: Any) -> None:
        model = state.model
        x, y = torch.cat(self._x), torch.cat(self._y)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(x[:1])              # the output's shape per row
            jacobian = per_sample_jacobian(model, x)
        finally:
            model.train(training)
        self.history.append((state.step, float(ntk_target_alignment(jacobian, _as_targets(y, outputs)))))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": torch.tensor(self.history, dtype=_STAT).reshape(-1, 2),
                                 "closed": self._closed}
        if self._x:
            state.update(probe_x=torch.cat(self._x), probe_targets=torch.cat(self._y))
        return state

    def load_state_dict(self, state: Any) -> None:
        self._x = [torch.as_tensor(state["probe_x"]).clone()] if "probe_x" in state else []
        self._y = [torch.as_tensor(state["probe_targets"]).clone()] if "probe_x" in state else []
        self._closed = bool(state["closed"])
        self.history = [(int(s), float(a)) for s, a in torch.as_tensor(state["history"]).tolist()]


_LEFT_OUT = (
    "Only the paper's abstract and summaries were reachable here: the alignment is the standard "
    "centred kernel alignment (Cortes et al. 2012) it names, normalised by ||HLH||_F = ||Hy||^2 "
    "(a kernel equal to y y^T scores 1; the catalogue's ||y||^2 does not give 1 when y has a "
    "non-zero mean). Not here: the kernel movement ||K_t - K_0|| / ||K_0||, the lazy K_0 "
    "kernel-regression predictor, the output scaling alpha as a model wrapper (f = alpha "
    "(f_theta - f_theta0) scales K by alpha^2, which leaves A unchanged), the DMFT theory and "
    "the paper's MNIST / transformer / student-teacher experiments.")

CARD = Card(
    name=_NAME, kind="metric",
    title="Grokking as the Transition from Lazy to Rich Training Dynamics",
    paper="arXiv:2310.06110",
    summary="Centred kernel alignment between the empirical NTK of a probe set (per-sample "
            "parameter gradients by torch.func, per_sample_jacobian) and the label kernel y y^T; "
            "update(jacobian, targets). It stays near its initial value in lazy training and "
            "rises when the network learns features (the grokking transition).",
    formula="K_ij = sum_c <d f_c(x_i)/d theta, d f_c(x_j)/d theta>; L = Y Y^T; H = I - 11^T/n; "
            "A = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)",
    left_out=_LEFT_OUT,
)

CALLBACK_CARD = Card(
    name=_NAME, kind="callback",
    title="Grokking as the Transition from Lazy to Rich Training Dynamics",
    paper="arXiv:2310.06110",
    summary="Records the centred NTK-label alignment on a fixed probe set (the first probe_size "
            "training rows) every `every` optimizer steps into its checkpointed history; "
            "class-id targets become one-hot rows of the model's outputs.",
    formula="K_ij = sum_c <d f_c(x_i)/d theta, d f_c(x_j)/d theta>; L = Y Y^T; H = I - 11^T/n; "
            "A = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)",
    left_out=_LEFT_OUT,
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(NTKAlignment, card=CARD)
    registry.add(NTKAlignmentTracker, card=CALLBACK_CARD)
