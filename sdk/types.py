"""Records that flow between plugins: Views, Batch, Loss, Pairs; typed scores Logits, Probabilities.

The records are frozen attrs classes with keyword-only fields. Construction validates types and
batch sizes and raises :class:`sdk.ShapeError` / ``TypeError`` naming the field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch
from torch import Tensor

from sdk.errors import ShapeError

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _shape(t: Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def _tensor_or_none(record: str, field: str, value: Any) -> None:
    if value is not None and not isinstance(value, Tensor):
        raise TypeError(f"{record}.{field}: expected a torch.Tensor or None, got {type(value).__name__}")


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if value is None or value is _EMPTY or (type(value) is dict and not value):
        return _EMPTY
    if not isinstance(value, Mapping):
        raise TypeError(f"extras: expected a mapping of str to values, got {type(value).__name__}")
    return MappingProxyType(dict(value))


def _embeddings(value: Any) -> tuple[Tensor, ...]:
    if isinstance(value, Tensor):
        raise TypeError("Views.embeddings: expected a tuple of [B, D] tensors (one per view), "
                        "got a single tensor; wrap it: Views(embeddings=(z,))")
    return tuple(value)


_BUILDERS: dict[tuple[type, bool], Any] = {}


def unchecked_builder(cls: type, *, convert: bool = True) -> Any:
    """A keyword-only constructor of the record class ``cls`` that converts its fields but does
    not validate them: for the engine's own records once the first micro-batch's passed
    validation (users and plugins build records through the validating constructors).
    ``convert=False``: the values are stored as given (the caller passes them in their
    converted form already: a tuple of embeddings, a frozen mapping).

    Generated once per class from its attrs fields, as attrs generates ``__init__``: one
    assignment per field (through the field's slot descriptor where the class has slots), a
    converter only where a value is given (defaults are stored as they are), so building a
    record costs no per-field loop."""
    builder = _BUILDERS.get((cls, convert))
    if builder is not None:
        return builder
    fields = attrs.fields(cls)
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_missing": object()}
    slots = "__slots__" in cls.__dict__
    params, body = [], ["r = _new(_cls)"]
    for i, f in enumerate(fields):
        if isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            raise TypeError(f"unchecked_builder: {cls.__name__}.{f.name} has a factory default")
        scope[f"_default{i}"] = f.default
        if slots:
            scope[f"_set{i}"] = cls.__dict__[f.name].__set__
            store = f"_set{i}(r, {{}})"
        else:
            scope[f"_set{i}"] = object.__setattr__
            store = f"_set{i}(r, {f.name!r}, {{}})"
        if f.converter is None or not convert:
            params.append(f"{f.name}=_default{i}")
            body.append(store.format(f.name))
        else:
            scope[f"_convert{i}"] = f.converter
            params.append(f"{f.name}=_missing")
            body.append(store.format(f"_default{i} if {f.name} is _missing "
                                     f"else _convert{i}({f.name})"))
    source = (f"def build_{cls.__name__}(*, {', '.join(params)}):\n    "
              + "\n    ".join([*body, "return r"]))
    exec(compile(source, f"<unchecked {cls.__name__}>", "exec"), scope)  # our own source only
    builder = _BUILDERS[cls, convert] = scope[f"build_{cls.__name__}"]
    return builder


def check_ids(owner: str, field: str, ids: Tensor, high: int | None = None) -> None:
    """Raise :class:`sdk.ShapeError` naming ``owner`` and ``field`` unless ``ids`` (class ids,
    dataset indices, group ids) are an integer tensor ``[B]``, in ``[0, high)`` when ``high``
    is given.

    The range check reads the values (a host sync): hot paths check the dtype and rank only
    (``high=None``) and call it with ``high`` once torch failed on the ids, to say why."""
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ShapeError(f"{owner}: {field} must be integer ids [B], got {ids.dtype} {_shape(ids)}")
    if high is not None and ids.numel():
        low, top = (int(v) for v in torch.aminmax(ids))
        if low < 0 or top >= high:
            raise ShapeError(f"{owner}: {field} must lie in [0, {high}), got ids in [{low}, {top}]")


@attrs.frozen(kw_only=True)
class Views:
    """Model outputs for one batch.

    ``embeddings``: one ``[B, D]`` tensor per view; ``logits``: ``[B, C]`` class scores, or a
    sequence model's next-token scores ``[B, T, V]`` (:mod:`sdk.sequence`);
    ``extras``: further named outputs (e.g. :data:`sdk.keys.TEACHER`: the teacher's embeddings
    per view, :data:`sdk.keys.FEATURES`: backbone features before the projection head).
    """

    embeddings: tuple[Tensor, ...] = attrs.field(default=(), converter=_embeddings)
    logits: Tensor | None = None
    extras: Mapping[str, Any] = attrs.field(default=_EMPTY, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        sizes = []
        for i, z in enumerate(self.embeddings):
            if not isinstance(z, Tensor):
                raise TypeError(f"Views.embeddings[{i}]: expected a torch.Tensor, "
                                f"got {type(z).__name__}")
            if z.dim() != 2:
                raise ShapeError(f"Views.embeddings[{i}]: expected shape [B, D], got {_shape(z)}")
            sizes.append(z.shape)
        if len({s for s in sizes}) > 1:
            shapes = ", ".join(f"embeddings[{i}]={list(s)}" for i, s in enumerate(sizes))
            raise ShapeError(f"Views.embeddings: all views must share one shape [B, D]; got {shapes}")
        _tensor_or_none("Views", "logits", self.logits)
        if self.logits is not None:
            if self.logits.dim() not in (2, 3):
                raise ShapeError(f"Views.logits: expected shape [B, C] (or a sequence's [B, T, V]), "
                                 f"got {_shape(self.logits)}")
            if sizes and self.logits.shape[0] != sizes[0][0]:
                raise ShapeError(f"Views.logits: batch size {self.logits.shape[0]} does not match "
                                 f"embeddings' batch size {sizes[0][0]}")

    @property
    def n_views(self) -> int:
        return len(self.embeddings)

    @property
    def batch_size(self) -> int:
        if self.embeddings:
            return self.embeddings[0].shape[0]
        if self.logits is not None:
            return self.logits.shape[0]
        raise ShapeError("Views: holds neither embeddings nor logits")

    def evolve(self, **changes: Any) -> Views:
        return attrs.evolve(self, **changes)


@attrs.frozen(kw_only=True)
class Batch:
    """What is known about the samples of one batch (every field optional).

    ``targets``: class ids ``[B]`` (long), soft labels or multi-label sets ``[B, C]``;
    ``index``: dataset indices ``[B]`` (long) for per-sample state; ``domain``: ids ``[B]``;
    ``weight``: sample weights ``[B]``; ``extras``: further per-sample tensors or values.
    """

    targets: Tensor | None = None
    index: Tensor | None = None
    domain: Tensor | None = None
    weight: Tensor | None = None
    extras: Mapping[str, Any] = attrs.field(default=_EMPTY, converter=_frozen_mapping)

    def __attrs_post_init__(self) -> None:
        sizes: dict[str, int] = {}
        for name in ("targets", "index", "domain", "weight"):
            value = getattr(self, name)
            _tensor_or_none("Batch", name, value)
            if value is None:
                continue
            if value.dim() == 0:
                raise ShapeError(f"Batch.{name}: expected a per-sample tensor [B, ...], got a scalar")
            if name != "targets" and value.dim() != 1:
                raise ShapeError(f"Batch.{name}: expected shape [B], got {_shape(value)}")
            sizes[name] = value.shape[0]
        for name in ("index", "domain"):
            value = getattr(self, name)
            if value is not None and value.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"Batch.{name}: expected an integer tensor, got {value.dtype}")
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ShapeError(f"Batch: fields disagree on the batch size ({detail})")

    @property
    def batch_size(self) -> int | None:
        for name in ("targets", "index", "domain", "weight"):
            value = getattr(self, name)
            if value is not None:
                return value.shape[0]
        return None

    def evolve(self, **changes: Any) -> Batch:
        return attrs.evolve(self, **changes)


@attrs.frozen(kw_only=True, init=False)
class Loss:
    """An objective's result: scalar ``value``, optional ``per_sample`` [B], detached ``logs``."""

    value: Tensor
    per_sample: Tensor | None = None
    logs: Mapping[str, Tensor] = _EMPTY

    def __init__(self, *, value: Tensor, per_sample: Tensor | None = None,
                 logs: Mapping[str, Tensor] = _EMPTY) -> None:
        # validates and stores in one call (objectives build one per step): attrs' generated
        # __init__ would add a call of __attrs_post_init__ and a bound setter
        if not isinstance(value, Tensor):
            raise TypeError(f"Loss.value: expected a scalar torch.Tensor, got {type(value).__name__}")
        if value.dim() != 0:
            raise ShapeError(f"Loss.value: expected a scalar (0-dim) tensor, got {_shape(value)}")
        if per_sample is not None:
            _tensor_or_none("Loss", "per_sample", per_sample)
            if per_sample.dim() != 1:
                raise ShapeError(f"Loss.per_sample: expected shape [B], got {_shape(per_sample)}")
        _set_value(self, value)
        _set_per_sample(self, per_sample)
        _set_logs(self, logs if logs is _EMPTY else _frozen_mapping(logs))  # most log nothing


_set_value, _set_per_sample, _set_logs = (Loss.__dict__[f.name].__set__ for f in attrs.fields(Loss))


@attrs.frozen(kw_only=True)
class Pairs:
    """Which (anchor, candidate) pairs count, as boolean masks ``[A, N]``.

    Rows are anchors and columns candidates, both indexing ``torch.cat(views.embeddings)``
    unless the objective documents otherwise. ``weight`` ``[A, N]`` scales each pair (a pair
    of weight w counts w times). ``extra_negatives`` ``[A, M, D]`` are synthetic negatives
    appended per anchor (e.g. hard negative mixing); ``extra_negative_sims`` ``[A, M]`` are the
    cosine similarities of each anchor with synthetic negatives given without their vectors.
    ``extra_negative_mask`` ``[A, M]`` says which of the synthetic negatives count (all when
    None): those of ``extra_negatives`` when given, else those of ``extra_negative_sims``.
    """

    positive: Tensor
    negative: Tensor
    weight: Tensor | None = None
    extra_negatives: Tensor | None = None
    extra_negative_mask: Tensor | None = None
    extra_negative_sims: Tensor | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("positive", "negative"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"Pairs.{name}: expected a bool torch.Tensor, got {type(value).__name__}")
            if value.dtype != torch.bool:
                raise TypeError(f"Pairs.{name}: expected dtype torch.bool, got {value.dtype}")
            if value.dim() != 2:
                raise ShapeError(f"Pairs.{name}: expected shape [A, N], got {_shape(value)}")
        if self.positive.shape != self.negative.shape:
            raise ShapeError(f"Pairs: positive {_shape(self.positive)} and negative "
                             f"{_shape(self.negative)} masks differ in shape")
        _tensor_or_none("Pairs", "weight", self.weight)
        if self.weight is not None and self.weight.shape != self.positive.shape:
            raise ShapeError(f"Pairs.weight: expected shape {_shape(self.positive)}, "
                             f"got {_shape(self.weight)}")
        _tensor_or_none("Pairs", "extra_negatives", self.extra_negatives)
        if self.extra_negatives is not None and (
            self.extra_negatives.dim() != 3 or self.extra_negatives.shape[0] != self.positive.shape[0]
        ):
            raise ShapeError(f"Pairs.extra_negatives: expected shape [{self.positive.shape[0]}, M, D], "
                             f"got {_shape(self.extra_negatives)}")
        _tensor_or_none("Pairs", "extra_negative_sims", self.extra_negative_sims)
        if self.extra_negative_sims is not None and (
            self.extra_negative_sims.dim() != 2
            or self.extra_negative_sims.shape[0] != self.positive.shape[0]
        ):
            raise ShapeError(f"Pairs.extra_negative_sims: expected shape [{self.positive.shape[0]}, M], "
                             f"got {_shape(self.extra_negative_sims)}")
        _tensor_or_none("Pairs", "extra_negative_mask", self.extra_negative_mask)
        if self.extra_negative_mask is not None:
            if self.extra_negatives is None and self.extra_negative_sims is None:
                raise ValueError("Pairs.extra_negative_mask: given without extra_negatives or "
                                 "extra_negative_sims")
            if self.extra_negative_mask.dtype != torch.bool:
                raise TypeError(f"Pairs.extra_negative_mask: expected dtype torch.bool, "
                                f"got {self.extra_negative_mask.dtype}")
            masked = (self.extra_negatives.shape[:2] if self.extra_negatives is not None
                      else self.extra_negative_sims.shape)
            if self.extra_negative_mask.shape != masked:
                raise ShapeError(f"Pairs.extra_negative_mask: expected shape {list(masked)}, "
                                 f"got {_shape(self.extra_negative_mask)}")


class TypedScores(Tensor):
    """A tensor of class scores that says what it holds (:attr:`kind`), so a plugin declaring
    the scores it takes (``Calibrator.inputs``, ``Detector.inputs``) rejects the other kind.

    Wrapping shares the data and keeps the autograd graph; operations on a typed tensor return
    plain tensors (the result of ``softmax`` or ``log`` is no longer what it was).
    """

    kind: str = ""
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, data: Tensor) -> TypedScores:
        if not isinstance(data, Tensor):
            raise TypeError(f"sdk.{cls.__name__}: expected a torch.Tensor, got {type(data).__name__}")
        if not data.is_floating_point() or data.dim() == 0:
            raise ShapeError(f"sdk.{cls.__name__}: expected a floating-point tensor [N, ...], got "
                             f"{data.dtype} {_shape(data)}")
        return data.as_subclass(cls)


class Logits(TypedScores):
    """Unnormalised class scores (``softmax`` gives probabilities): ``sdk.Logits(z)``."""

    kind = "logits"


class Probabilities(TypedScores):
    """Class probabilities in ``[0, 1]``: ``sdk.Probabilities(p)``."""

    kind = "probabilities"

    def __new__(cls, data: Tensor) -> Probabilities:
        out = super().__new__(cls, data)
        if data.numel() == 0:
            return out
        low, high = torch.aminmax(data.detach())
        if low < 0 or high > 1:
            raise ValueError(f"sdk.Probabilities: values must lie in [0, 1], got the range "
                             f"[{float(low):.4g}, {float(high):.4g}] (logits? wrap them as sdk.Logits)")
        return out
