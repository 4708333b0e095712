"""Fire Together Wire Together (FTWT): dynamic pruning with self-supervised mask predictors.

Elkerdawy, Elhoushi, Zhang and Ray, "Fire Together Wire Together: A Dynamic Pruning Approach with
Self-Supervised Mask Prediction", CVPR 2022, arXiv:2110.08232 (authors' code: selkerdawy/FTWT).

Encoder ``ftwt_mask_predictor``: at every gated layer ``l`` (output ``a_l [B, C, ...]`` after its
activation) a mask predictor reads the layer's input ``h_{l-1}`` (the previous gated layer's
output, the encoder input for the first), detached:

    s_l = W_l softmax_c(GAP(h_{l-1})) + b_l,        a_l <- a_l * 1[s_l > 0]

(in training and evaluation; no gradient flows through the binary mask, so the task loss never
trains the predictors). The self-supervised target keeps the units that carry the heat-map mass:
with ``m_j = max_spatial |a_j|`` and ``p_j = m_j / sum_i m_i``, units ranked by ``p``
(descending, ties by index), ``t_j = 1[P_j <= r + delta and p_j > delta]``, ``P_j`` the cumulative
mass up to and including ``j``, ``delta = 1e-5`` (the authors' rule: the unit whose mass crosses
``r`` is dropped). Objective ``ftwt_mask_predictor``:
``L = 1/L sum_l sum_j mean_b BCEWithLogits(s_lbj, t_lbj)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder, Objective
from sdk.layers import check_features, mlp_layers
from sdk.types import Batch, Loss, Views

DELTA = 1e-5
_GATED = (nn.ReLU, nn.ReLU6)


def heat_mass_targets(a: Tensor, threshold: float) -> Tensor:
    """The target mask ``[B, C]`` of activations ``a [B, C, ...]`` (see the module docstring);
    an all-zero sample keeps no unit."""
    a = a.detach().float()
    heat = a.abs().flatten(2).amax(-1) if a.dim() > 2 else a.abs()
    p = heat / heat.sum(1, keepdim=True).clamp_min(torch.finfo(heat.dtype).tiny)
    sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
    keep_sorted = (sorted_p.cumsum(1) - threshold <= DELTA) & (sorted_p > DELTA)
    return torch.zeros_like(p).scatter(1, order, keep_sorted.to(p.dtype))


def _pool(h: Tensor) -> Tensor:
    return h.flatten(2).mean(-1) if h.dim() > 2 else h


class _Trace:
    """What one forward shares between the gates: the current layer input and the records."""

    def __init__(self) -> None:
        self.prev: Tensor | None = None
        self.logits: list[Tensor] = []
        self.targets: list[Tensor] = []

    def __deepcopy__(self, memo: dict) -> _Trace:  # a copy (a teacher) starts with no records
        return _Trace()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class _Gate(nn.Module):
    """The mask predictor of one gated layer; :meth:`hook` is its forward hook."""

    def __init__(self, in_channels: int, channels: int, threshold: float, softmax: bool,
                 trace: _Trace):
        super().__init__()
        self.predictor = nn.Linear(in_channels, channels)
        self.threshold, self.softmax, self.channels = threshold, softmax, channels
        self._trace = trace

    def hook(self, module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
        trace = self._trace
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[1] != self.channels:
            raise ShapeError(f"encoder 'ftwt_mask_predictor': a gated layer must output "
                             f"[B, {self.channels}, ...], got {list(getattr(out, 'shape', []))}")
        pooled = _pool(trace.prev.detach())
        if self.softmax:
            pooled = pooled.softmax(-1)
        logits = self.predictor(pooled.to(self.predictor.weight.dtype))
        trace.logits.append(logits)
        trace.targets.append(heat_mass_targets(out, self.threshold))
        keep = (logits.detach() > 0).to(out.dtype).reshape(*logits.shape, *(1,) * (out.dim() - 2))
        out = out * keep
        trace.prev = out
        return out


class FTWTMaskPredictor(Encoder):
    """An encoder whose gated layers are pruned per input by mask predictors (module docstring).

    With ``backbone`` (any sdk Encoder, changed in place: its gated layers get forward hooks),
    the layers named in ``gates`` (``named_modules`` names) are gated, by default every
    ``nn.ReLU``/``nn.ReLU6``; their output must keep the channels in dimension 1 and each must
    run once per forward, the predictor of one reading the previous one's output (a chain, as
    in the paper's VGG/MobileNet). ``input_shape`` (one sample's
    shape; ``(backbone.in_dim,)`` when the backbone has one) is used once to find the widths.
    Without ``backbone``, an MLP ``in_dim -> hidden_dims -> out_dim`` (batch norm, ReLU) is built
    and its ReLUs are gated. The predictor records of each forward are published after it as
    ``Views.extras[keys.GATE_LOGITS]`` / ``[keys.GATE_TARGETS]`` for the objective."""

    def __init__(self, backbone: Encoder | None = None,
                 in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 hidden_dims: tuple[int, ...] | list[int] = (256, 256),
                 out_dim: Annotated[int, Ge(1)] = 128,
                 threshold: Annotated[float, Interval(gt=0, le=1)] = 1.0,
                 gates: tuple[str, ...] | list[str] = (), softmax: bool = True,
                 input_shape: Sequence[int] | None = None):
        super().__init__()
        self.backbone, self.threshold = backbone, threshold
        self._trace = _Trace()
        if backbone is None:
            if not hidden_dims:
                raise ConfigError("ftwt_mask_predictor: hidden_dims must name at least one "
                                  "gated layer", param="hidden_dims")
            self.in_dim, self.out_dim = in_dim, out_dim
            self.net = mlp_layers([in_dim, *hidden_dims, out_dim])
            net, shape = self.net, (in_dim,)
        else:
            self.in_dim, self.out_dim = getattr(backbone, "in_dim", None), backbone.out_dim
            net = backbone
            shape = tuple(input_shape) if input_shape is not None else (
                (self.in_dim,) if isinstance(self.in_dim, int) else None)
            if shape is None:
                raise ConfigError("ftwt_mask_predictor: give input_shape (one sample's shape) for "
                                  f"a {type(backbone).__name__} backbone without in_dim",
                                  param="input_shape")
        named = dict(net.named_modules())
        if gates:
            missing = [g for g in gates if g not in named]
            if missing:
                raise ConfigError(f"ftwt_mask_predictor: no submodule named {missing} in "
                                  f"{type(net).__name__}", param="gates")
            layers = [named[g] for g in gates]
        else:
            layers = [m for m in net.modules() if isinstance(m, _GATED)]
            if not layers:
                raise ConfigError(f"ftwt_mask_predictor: {type(net).__name__} has no ReLU to gate; "
                                  "name the gated layers in gates", param="gates")
        widths = self._probe(net, layers, shape)
        self.gates = nn.ModuleList(_Gate(c_in, c, threshold, softmax, self._trace)
                                   for c_in, c in widths)
        for layer, gate in zip(self._order, self.gates):
            layer.register_forward_hook(gate.hook)

    def _probe(self, net: nn.Module, layers: list[nn.Module], shape: tuple[int, ...]
               ) -> list[tuple[int, int]]:
        """One dry forward (no gradient, eval mode, modes restored) to find, in firing order,
        each gated layer's input width (the previous gated output's) and its width."""
        fired: list[tuple[nn.Module, int]] = []
        handles = [m.register_forward_hook(lambda m, i, o: fired.append((m, o.shape[1])))
                   for m in set(layers)]
        modes = {m: m.training for m in net.modules()}
        try:
            net.eval()
            with torch.no_grad():
                param = next(net.parameters(), None)
                net(torch.zeros(2, *shape, dtype=param.dtype if param is not None else None))
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        order = [m for m, _ in fired]
        if len(set(order)) != len(order) or len(order) != len(set(layers)):
            raise ConfigError("ftwt_mask_predictor: every gated layer must run exactly once per "
                              "forward (a module applied twice, e.g. one shared ReLU, cannot be "
                              "gated)", param="gates")
        self._order = order
        widths, prev = [], (shape[0] if len(shape) > 1 else int(torch.Size(shape).numel()))
        for _, c in fired:
            widths.append((prev, c))
            prev = c
        return widths

    def _begin(self, x: Tensor) -> None:
        trace = self._trace
        trace.prev, trace.logits, trace.targets = x, [], []

    def features(self, x: Tensor) -> Tensor:
        if self.backbone is None:
            return self(x)
        self._begin(x)
        return self.backbone.features(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone is not None:
            self._begin(x)
            return self.backbone(x)
        if x.dim() < 2:
            raise ShapeError(f"encoder 'ftwt_mask_predictor': x must be a batch [B, ...] of "
                             f"{self.in_dim} features, got {list(x.shape)}")
        x = x.flatten(1)
        check_features("encoder 'ftwt_mask_predictor'", "x (flattened)", x, self.in_dim,
                       module=self.net, batch_norm=True)
        self._begin(x)
        return self.net(x)

    def masks(self) -> tuple[Tensor, ...]:
        """The binary masks the last forward applied, one ``[B, C_l]`` per gated layer."""
        return tuple((s.detach() > 0).float() for s in self._trace.logits)

    def targets(self) -> tuple[Tensor, ...]:
        """The target masks of the last forward (their mean over a dense model is the paper's
        FLOPs estimate before training)."""
        return tuple(self._trace.targets)

    def after_forward(self, state: Any) -> None:
        trace = self._trace
        if state.views is not None and trace.logits:
            state.views = state.views.evolve(extras={
                **state.views.extras, keys.GATE_LOGITS: tuple(trace.logits),
                keys.GATE_TARGETS: tuple(trace.targets)})


def mask_prediction_loss(logits: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Per-sample ``1/L sum_l sum_j BCEWithLogits(s_lj, t_lj)``, ``[B]``, in float32."""
    total = sum(F.binary_cross_entropy_with_logits(s.float(), t.detach().float(),
                                                   reduction="none").sum(-1)
                for s, t in zip(logits, targets))
    return total / len(logits)


class FTWTMaskLoss(Objective):
    """The mask predictors' BCE above, from ``Views.extras[keys.GATE_LOGITS]`` and
    ``[keys.GATE_TARGETS]`` (what the ``ftwt_mask_predictor`` encoder publishes in training);
    add it to the task loss: the predictors see detached inputs and the mask carries no
    gradient, so the two losses train disjoint parameters (the paper's decoupled mode)."""

    requires = {"extras": (keys.GATE_LOGITS, keys.GATE_TARGETS)}
    batch_coupled = False

    def forward(self, views: Views, batch: Batch) -> Loss:
        def get(key: str) -> Any:
            return views.extras.get(key, batch.extras.get(key))

        logits, targets = get(keys.GATE_LOGITS), get(keys.GATE_TARGETS)
        if not isinstance(logits, (tuple, list)) or not logits or \
                not isinstance(targets, (tuple, list)) or len(targets) != len(logits):
            raise ShapeError("objective 'ftwt_mask_predictor': extras['gate_logits'] and "
                             "['gate_targets'] must be tuples of as many tensors, one per gated "
                             "layer")
        n = views.batch_size
        for i, (s, t) in enumerate(zip(logits, targets)):
            if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() != 2 or \
                    s.shape[0] != n:
                raise ShapeError(f"objective 'ftwt_mask_predictor': extras['gate_logits'][{i}] "
                                 f"must be floating [{n}, C], got "
                                 f"{getattr(s, 'dtype', type(s).__name__)} "
                                 f"{list(getattr(s, 'shape', []))}")
            if not isinstance(t, Tensor) or t.shape != s.shape:
                raise ShapeError(f"objective 'ftwt_mask_predictor': extras['gate_targets'][{i}] "
                                 f"must be {list(s.shape)} like its logits, got "
                                 f"{list(getattr(t, 'shape', []))}")
        per_sample = mask_prediction_loss(logits, targets)
        with torch.no_grad():
            acc = torch.stack([((s > 0).float() == t.float()).float().mean()
                               for s, t in zip(logits, targets)]).mean()
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"ftwt/mask_accuracy": acc})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        logits = tuple(torch.randn(batch_size, c, generator=generator).requires_grad_()
                       for c in (6, 4))
        targets = tuple((torch.rand(batch_size, c, generator=generator) > 0.5).float()
                        for c in (6, 4))
        views = Views(embeddings=(torch.randn(batch_size, 4, generator=generator),),
                      extras={keys.GATE_LOGITS: logits, keys.GATE_TARGETS: targets})
        return views, Batch(index=torch.arange(batch_size))


ENCODER_CARD = Card(
    name="ftwt_mask_predictor", kind="encoder",
    title="Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask "
          "Prediction",
    paper="arXiv:2110.08232",
    summary="Per-input unit pruning: a predictor on each gated layer's (detached, pooled) input "
            "decides which units run; trained to predict the units that hold a fraction r of "
            "the layer's heat-map mass.",
    formula="s_l = W_l softmax(GAP(h_{l-1})) + b_l; a_l <- a_l * 1[s_l > 0]; "
            "t_j = 1[cummass_j <= r + 1e-5 and p_j > 1e-5], p_j = max|a_j| / sum_i max|a_i|",
    left_out="Conv gating is generic here (channels in dimension 1, predictor on the previous "
             "gated output), not the authors' per-architecture fusion of conv+BN+ReLU in "
             "VGG/ResNet/MobileNet (the residual-block placement, the optional spatial pooling "
             "grid 'embedding' > 1, the joint mode with gradients into the backbone, the "
             "initialisation of the heads to output ones, the cool-down that stops the mask "
             "loss). FLOPs are estimated from the kept units (no sparse kernels); no "
             "CIFAR/ImageNet. threshold defaults to the authors' script default r = 1 (drop only "
             "units with no mass); the paper reports several r.",
)

OBJECTIVE_CARD = Card(
    name="ftwt_mask_predictor", kind="objective", title=ENCODER_CARD.title,
    paper="arXiv:2110.08232",
    summary="Self-supervised binary classification of the mask predictors: BCE between their "
            "logits and the heat-map-mass target masks, summed over units, averaged over layers.",
    formula="L = 1/L sum_l sum_j mean_b BCEWithLogits(s_lbj, t_lbj)",
    left_out="The authors' loss weight schedule (weight 1, 0 after the cool-down epoch) is the "
             "user's to apply (e.g. with an objective schedule).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FTWTMaskPredictor, card=ENCODER_CARD)
    registry.add(FTWTMaskLoss, card=OBJECTIVE_CARD)
