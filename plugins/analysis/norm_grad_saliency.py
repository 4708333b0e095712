"""NormGrad saliency and the pointing game that scores saliency maps.

Rebuffi, Fong, Ji, Vedaldi, "There and Back Again: Revisiting Backpropagation Saliency
Methods", CVPR 2020 (arXiv:2004.02866). A convolution's weight gradient is a sum over spatial
locations ``u`` of outer products ``g_u a_u^T`` of the gradient ``g_u`` of the target score
w.r.t. the layer's output and the layer's input (patch) ``a_u``; NormGrad's saliency is the
Frobenius norm of each location's contribution, ``||g_u a_u^T||_F = ||g_u|| ||a_u||``. With the
paper's *virtual identity* trick a 1x1 identity convolution is imagined after the chosen layer,
so ``a_u`` and ``g_u`` are the layer's output and the gradient w.r.t. it.

The paper's framework has two phases, both parameters here. Phase 1, the virtual layer whose
weight gradient is read: ``conv1x1`` (NormGrad), ``conv3x3`` (a virtual 3x3 identity: ``a_u``
is the 3x3 neighbourhood of the output), ``scaling`` (a per-channel scale: ``a_u * g_u``),
``bias`` (``g_u``: the plain gradient) and ``layer`` (no virtual layer: the chosen
``Conv2d``/``Linear``'s own input patches and output gradient, the paper's "NormGrad without
the virtual identity trick"). Phase 2, the aggregation over a location's entries: ``norm``,
``filter_norm`` (the norm of the positive entries; ``scaling`` + ``filter_norm`` is NormGrad
selective), ``sum`` (``scaling`` + ``sum`` is the linear approximation) and ``max``. Maps of
several layers are combined as in the authors' code: each upsampled bilinearly to the input's
size, min-max normalised to [0, 1], then multiplied (``product``) or averaged (``sum``) with
layer weights. Outer products are never formed: each aggregate of ``g a^T`` factorises.

The metric is the pointing game the paper evaluates with (Zhang et al. 2016): a map scores a
hit when its maximum lies within ``tolerance`` pixels of the object's mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, MinLen
from torch import Tensor, nn

from sdk.capture import Taps
from sdk.card import Card
from sdk.constraints import check, declared, one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import nan_if_any_nan

_NAME = "norm_grad_saliency"
_STAT = torch.float64
_LAYER_TYPES = ("conv1x1", "conv3x3", "scaling", "bias", "layer")
_AGGREGATES = ("norm", "filter_norm", "sum", "max")
_COMBINE = ("product", "sum")


def _spatial(t: Tensor, what: str) -> Tensor:
    """``[N, C, H, W]`` as it is, ``[N, C]`` as ``[N, C, 1, 1]`` (one location)."""
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() != 4:
        raise ShapeError(f"{_NAME}: {what} must be [N, C, H, W] or [N, C], got {list(t.shape)}")
    return t


def _sq(t: Tensor) -> Tensor:
    return t.pow(2).sum(dim=1)


def _outer_aggregate(a: Tensor, g: Tensor, aggregate: str) -> Tensor:
    """``agg_{ij} a_i g_j`` over the channel dimension 1 of ``a [N, P, H, W]`` and
    ``g [N, C, H, W]``, without forming the outer product: ``norm`` ``||a|| ||g||``,
    ``filter_norm`` ``(||a+||^2 ||g+||^2 + ||a-||^2 ||g-||^2)^(1/2)``, ``sum`` ``(sum a)(sum g)``,
    ``max`` the largest of the four products of the extremes."""
    if aggregate == "norm":
        return a.norm(dim=1) * g.norm(dim=1)
    if aggregate == "filter_norm":
        return (_sq(a.clamp(min=0)) * _sq(g.clamp(min=0))
                + _sq(a.clamp(max=0)) * _sq(g.clamp(max=0))).sqrt()
    if aggregate == "sum":
        return a.sum(dim=1) * g.sum(dim=1)
    a_hi, a_lo, g_hi, g_lo = a.amax(1), a.amin(1), g.amax(1), g.amin(1)
    return torch.stack([a_hi * g_hi, a_hi * g_lo, a_lo * g_hi, a_lo * g_lo]).amax(0)


def _elementwise_aggregate(v: Tensor, aggregate: str) -> Tensor:
    if aggregate == "norm":
        return v.norm(dim=1)
    if aggregate == "filter_norm":
        return v.clamp(min=0).norm(dim=1)
    if aggregate == "sum":
        return v.sum(dim=1)
    return v.amax(dim=1)


def _layer_patches(layer: nn.Module, name: str, inputs: Tensor, out_shape: torch.Size) -> Tensor:
    """The input patch ``a_u`` of each output location of ``layer`` (``[N, C k k, H', W']``)."""
    if isinstance(layer, nn.Linear):
        if inputs.dim() != 2:
            raise ShapeError(f"{_NAME}: layer_type='layer' needs Linear layer {name!r} to take "
                             f"[N, D] inputs, got {list(inputs.shape)}")
        return inputs[:, :, None, None]
    if (not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.padding_mode != "zeros"
            or isinstance(layer.padding, str)):
        raise ConfigError(f"{_NAME}: layer_type='layer' needs layer {name!r} to be an nn.Linear or "
                          f"an nn.Conv2d with groups=1 and numeric zero padding, got {layer!r}",
                          param="layer_type")
    cols = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)
    return cols.reshape(inputs.shape[0], cols.shape[1], *out_shape[-2:])


def layer_saliency(activation: Tensor, gradient: Tensor,
                   layer_type: Annotated[str, one_of(_LAYER_TYPES)] = "conv1x1",
                   aggregate: Annotated[str, one_of(_AGGREGATES)] = "norm",
                   layer: nn.Module | None = None, layer_input: Tensor | None = None,
                   name: str = "") -> Tensor:
    """The saliency map ``[N, H, W]`` of one layer from its output ``activation`` and the
    gradient of the score w.r.t. it (both ``[N, C, H, W]``, or ``[N, C]``: one location), for
    the virtual layer ``layer_type`` and the ``aggregate`` of the module docstring;
    ``layer_type='layer'`` also needs the ``layer`` module and its ``layer_input``."""
    check(_NAME, declared(layer_saliency), {"layer_type": layer_type, "aggregate": aggregate})
    a, g = _spatial(activation, "activation"), _spatial(gradient, "gradient")
    if a.shape != g.shape:
        raise ShapeError(f"{_NAME}: gradient {list(gradient.shape)} must have the shape of "
                         f"activation {list(activation.shape)}")
    if layer_type == "bias":
        return _elementwise_aggregate(g, aggregate)
    if layer_type == "scaling":
        return _elementwise_aggregate(a * g, aggregate)
    if layer_type == "conv3x3":
        cols = F.unfold(a, 3, padding=1).reshape(a.shape[0], a.shape[1] * 9, *a.shape[-2:])
        return _outer_aggregate(cols, g, aggregate)
    if layer_type == "layer":
        if layer is None or layer_input is None:
            raise ConfigError(f"{_NAME}: layer_type='layer' needs the layer and its input",
                              param="layer_type")
        return _outer_aggregate(_layer_patches(layer, name, layer_input, a.shape), g, aggregate)
    return _outer_aggregate(a, g, aggregate)


def _scores(out: Tensor, target: Tensor) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ShapeError(f"{_NAME}: the model must return scores [N, C], got "
                         f"{list(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    if target.shape != (out.shape[0],) or target.is_floating_point() or target.dtype == torch.bool:
        raise ShapeError(f"{_NAME}: target must be [{out.shape[0]}] class ids, got {target.dtype} "
                         f"{list(target.shape)}")
    if bool(((target < 0) | (target >= out.shape[1])).any()):
        raise ShapeError(f"{_NAME}: target must hold class ids in [0, {out.shape[1]})")
    return out.gather(1, target.to(out.device).long()[:, None]).sum()


def norm_grad_maps(model: nn.Module, x: Tensor, target: Tensor,
                   layers: Annotated[Sequence[str], MinLen(1)],
                   layer_type: Annotated[str, one_of(_LAYER_TYPES)] = "conv1x1",
                   aggregate: Annotated[str, one_of(_AGGREGATES)] = "norm") -> dict[str, Tensor]:
    """``{layer: map [N, H_l, W_l]}``: the saliency of each named layer (:func:`layer_saliency`)
    for the score ``model(x)[i, target_i]`` of each row, from one forward and one gradient
    (forward hooks of :class:`sdk.capture.Taps`; parameter gradients are left untouched). The
    model runs as given (put batch norm in eval mode: rows must not interact)."""
    check(_NAME, declared(norm_grad_maps), {"layers": layers, "layer_type": layer_type,
                                            "aggregate": aggregate})
    x = x.detach().requires_grad_()      # every layer's output then carries a graph
    with torch.enable_grad(), Taps(model, layers, _NAME) as taps:
        score = _scores(model(x), target)
    taps.check()
    names = list(taps.modules)
    grads = torch.autograd.grad(score, [taps.outputs[n] for n in names], allow_unused=True)
    out = {}
    for name, grad in zip(names, grads):
        act = taps.outputs[name]
        grad = torch.zeros_like(act) if grad is None else grad      # the score does not depend on it
        out[name] = layer_saliency(act.detach(), grad, layer_type, aggregate, taps.modules[name],
                                   taps.inputs.get(name), name).detach()
    return out


def combine_maps(maps: Mapping[str, Tensor], size: Sequence[int],
                 weights: Sequence[float] | None = None,
                 combine: Annotated[str, one_of(_COMBINE)] = "product") -> Tensor:
    """One map ``[N, *size]`` from per-layer maps ``[N, H_l, W_l]``: each upsampled bilinearly
    (``align_corners=False``) to ``size``, min-max normalised per row to [0, 1] (a constant row
    becomes 0), then ``product``: ``prod_l m_l^(w_l)`` or ``sum``: ``sum_l w_l m_l``, the
    weights normalised to sum to one (uniform when not given)."""
    check(_NAME, declared(combine_maps), {"combine": combine})
    if not maps:
        raise ConfigError(f"{_NAME}: combine_maps needs at least one map", param="layers")
    w = torch.ones(len(maps), dtype=_STAT) if weights is None else torch.tensor(weights, dtype=_STAT)
    if w.shape != (len(maps),) or not bool((w >= 0).all()) or not float(w.sum()) > 0:
        raise ConfigError(f"{_NAME}: layer_weights must be {len(maps)} values >= 0 (one per layer) "
                          f"with a positive sum, got {weights}", param="layer_weights")
    w = w / w.sum()
    out = None
    for (name, m), wl in zip(maps.items(), w.tolist()):
        if m.dim() != 3:
            raise ShapeError(f"{_NAME}: the map of layer {name!r} must be [N, H, W], got {list(m.shape)}")
        up = F.interpolate(m[:, None].to(_STAT), size=tuple(size), mode="bilinear",
                           align_corners=False)[:, 0]
        lo = up.flatten(1).amin(1)[:, None, None]
        span = up.flatten(1).amax(1)[:, None, None] - lo
        norm = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, 1.0), 0.0)
        term = norm.pow(wl) if combine == "product" else wl * norm
        out = term if out is None else (out * term if combine == "product" else out + term)
    return out


def norm_grad(model: nn.Module, x: Tensor, target: Tensor,
              layers: Annotated[Sequence[str], MinLen(1)],
              layer_type: Annotated[str, one_of(_LAYER_TYPES)] = "conv1x1",
              aggregate: Annotated[str, one_of(_AGGREGATES)] = "norm",
              combine: Annotated[str, one_of(_COMBINE)] = "product",
              layer_weights: Sequence[float] | None = None) -> Tensor:
    """NormGrad saliency ``[N, H, W]`` at the input's spatial size (``x`` ``[N, C, H, W]``):
    :func:`norm_grad_maps` of ``layers`` combined by :func:`combine_maps` (one layer: its map
    upsampled and normalised)."""
    if x.dim() != 4:
        raise ShapeError(f"{_NAME}: x must be images [N, C, H, W], got {list(x.shape)}")
    maps = norm_grad_maps(model, x, target, layers, layer_type, aggregate)
    return combine_maps(maps, x.shape[-2:], layer_weights, combine)


def pointing_hits(saliency: Tensor, mask: Tensor, tolerance: Annotated[float, Ge(0)] = 15.0) -> Tensor:
    """Per row (float64 ``[N]``): 1 when the maximum of ``saliency [N, H, W]`` (the first in
    row-major order on ties) lies within ``tolerance`` pixels (Euclidean) of a pixel of the
    ``mask [N, H, W]`` (boolean, or integers 0 and 1), else 0."""
    check(_NAME, declared(pointing_hits), {"tolerance": tolerance})
    if saliency.dim() != 3 or not saliency.is_floating_point():
        raise ShapeError(f"{_NAME}: saliency must be floating [N, H, W], got {saliency.dtype} "
                         f"{list(saliency.shape)}")
    if mask.shape != saliency.shape or mask.is_floating_point() or mask.is_complex():
        raise ShapeError(f"{_NAME}: mask must be boolean or 0/1 integers {list(saliency.shape)} like "
                         f"saliency, got {mask.dtype} {list(mask.shape)}")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ShapeError(f"{_NAME}: an integer mask must hold 0 and 1 only")
        mask = mask == 1
    if saliency.shape[0] and not bool(mask.flatten(1).any(1).all()):
        raise ShapeError(f"{_NAME}: every row of mask must mark at least one pixel")
    n, h, w = saliency.shape
    top = saliency.flatten(1).argmax(1)
    rows = torch.arange(h, device=mask.device, dtype=_STAT)[None, :, None]
    cols = torch.arange(w, device=mask.device, dtype=_STAT)[None, None, :]
    dist2 = ((rows - (top // w).to(_STAT)[:, None, None]) ** 2
             + (cols - (top % w).to(_STAT)[:, None, None]) ** 2)
    return (mask & (dist2 <= tolerance ** 2)).flatten(1).any(1).to(_STAT)


def _example(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments for the conformance kit: maps ``[B, 6, 6]`` peaked inside a 2x2
    object mask at a random place per row."""
    sal = torch.rand(batch_size, 6, 6, generator=generator)
    mask = torch.zeros(batch_size, 6, 6, dtype=torch.long)
    corner = torch.randint(0, 5, (batch_size, 2), generator=generator)
    for i, (r, c) in enumerate(corner.tolist()):
        mask[i, r:r + 2, c:c + 2] = 1
        sal[i, r, c] += 1
    return sal, mask


class NormGradSaliency(Metric):
    """``update(saliency, mask)`` adds each row's pointing-game hit (:func:`pointing_hits`) of a
    saliency map (:func:`norm_grad` gives NormGrad's); ``compute()`` gives ``pointing``, the hit
    rate over every row updated."""

    example_inputs = staticmethod(_example)

    def __init__(self, tolerance: Annotated[float, Ge(0)] = 15.0):
        self.tolerance = tolerance
        self.reset()

    def update(self, saliency: Tensor, mask: Tensor) -> None:
        hits = pointing_hits(saliency, mask, self.tolerance)
        total = hits.sum() + nan_if_any_nan(saliency).to(hits.device)
        count = torch.tensor(float(hits.numel()), dtype=_STAT, device=hits.device)
        self._hits = total if self._hits is None else self._hits + total.to(self._hits.device)
        self._count = count if self._count is None else self._count + count.to(self._count.device)

    def compute(self) -> dict[str, float]:
        if self._hits is None or not float(self._count) > 0:
            return {"pointing": math.nan}
        return {"pointing": float(self._hits / self._count)}

    def reset(self) -> None:
        self._hits: Tensor | None = None
        self._count: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self._hits is None else {"hits": self._hits.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        if "hits" in state:
            self._hits = torch.as_tensor(state["hits"]).clone()
            self._count = torch.as_tensor(state["count"]).clone()


CARD = Card(
    name=_NAME, kind="metric",
    title="There and Back Again: Revisiting Backpropagation Saliency Methods",
    paper="arXiv:2004.02866",
    summary="NormGrad saliency maps of named layers of a model (norm_grad(model, x, target, "
            "layers): forward hooks, one gradient of the target score) with the paper's "
            "extract-and-aggregate variants and its multi-layer combination, scored by the "
            "pointing game: update(saliency, mask) counts the maps whose maximum lies within "
            "`tolerance` pixels of the object mask.",
    formula="S_u = ||g_u a_u^T||_F = ||g_u|| ||a_u|| (conv1x1: a_u the layer's output at u, g_u = "
            "d score / d a_u; conv3x3: a_u its 3x3 neighbourhood; layer: the layer's own input "
            "patch; scaling: agg(a_u * g_u); bias: agg(g_u); aggregates norm, filter_norm, sum, "
            "max); layers: m_l = minmax(bilinear_up(S_l)), product prod_l m_l^(w_l) or sum "
            "sum_l w_l m_l, sum_l w_l = 1 (uniform by default); pointing = mean_i [argmax S_i "
            "within tolerance = 15 px of mask_i]",
    left_out="The paper's text could not be read here: the variants, the combination (bilinear "
             "upsampling, min-max normalisation, product or weighted sum) and the gradient of the "
             "class score follow the authors' code (the standalone grid script and TorchRay's "
             "normgrad branch); min-max normalisation is per row here (the authors' code runs one "
             "image at a time). The depthwise virtual 3x3 layer, Gaussian smoothing of the maps, "
             "the meta-saliency step (one SGD step on the image's loss before the saliency), the "
             "class-sensitivity metric, the per-layer weights the authors derived from ImageNet "
             "models (layer weights are an input here) and the VGG16 / ResNet-50 benchmarks on "
             "VOC and COCO are not here. layer_type='layer' takes nn.Linear and nn.Conv2d "
             "(groups 1, zero padding) only.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(NormGradSaliency, card=CARD)
