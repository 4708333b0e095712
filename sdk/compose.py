"""Objective algebra (``0.5 * a + b`` is a :class:`WeightedSum` that logs every term) and the
composition checks: what a Sampler, Teacher or Transform produces must be consumed.

:func:`check_composition` is the one rule, used by ``sdk.create`` (a plugin passed as a
parameter), the algebra (each term and its sampler), the Trainer and recipes
(:func:`check_parts`): every :class:`~sdk.interfaces.Input` a producer declares in
``produces`` must be in the objective's ``consumes``, else a ConfigError names both plugins
and the ignored inputs. Inputs an objective lists in ``caveats()`` are legal but surprising:
the first such composition of a pair of plugins warns.
"""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sdk.errors import ConfigError, PluginError
from sdk.interfaces import Input, Objective, Sampler, Schedule, Teacher, Transform
from sdk.types import Batch, Loss, Views

_KINDS = ((Objective, "objective"), (Sampler, "sampler"), (Teacher, "teacher"),
          (Transform, "transform"))
_WARNED: set[tuple[str, str, Input]] = set()


def describe(plugin: Any) -> str:
    """``kind 'name'`` of a plugin: its registry name, else its class name in snake case."""
    kind = next((k for base, k in _KINDS if isinstance(plugin, base)), "plugin")
    if isinstance(plugin, WeightedSum):
        return "objective " + " + ".join(f"{n!r}" for n in plugin._term_names)
    name = getattr(plugin, "_plugin_name", None) or _registered_name(kind, type(plugin))
    return f"{kind} {name!r}"


def _registered_name(kind: str, cls: type) -> str:
    """The name ``cls`` is registered under as a plugin of ``kind``, else its class name in snake
    case (``CACR`` -> ``cacr``, ``HardNegativeMixing`` -> ``hard_negative_mixing``)."""
    from sdk.registry import get_registry

    reg = get_registry()
    for card in reg.cards(kind) if kind != "plugin" else ():
        try:
            if reg.get(kind, card.name).factory is cls:
                return card.name
        except PluginError:  # a name two packages register: not this plugin's to claim
            continue
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls.__name__).lower()


def _inputs(inputs: Iterable[Input]) -> str:
    return ", ".join(sorted(i.value for i in inputs))


def check_composition(objective: Objective, producer: Any) -> None:
    """Raise ConfigError if ``objective`` ignores an input that ``producer`` (a Sampler, Teacher
    or Transform) produces; warn once per pair of plugins for each input the objective lists in
    ``caveats()``."""
    produced = frozenset(getattr(producer, "produces", ()))
    ignored = produced - frozenset(objective.consumes)
    if ignored:
        raise ConfigError(
            f"{describe(objective)} ignores the {_inputs(ignored)} that {describe(producer)} "
            f"produces (it consumes: {_inputs(objective.consumes) or 'nothing'}); the "
            f"composition would silently drop them. Use an objective that consumes "
            f"{_inputs(ignored)} or another {describe(producer).split()[0]}")
    for item, why in objective.caveats().items():
        key = (describe(objective), describe(producer), item)
        if item in produced and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{key[0]} with {key[1]} ({item.value}): {why}", UserWarning,
                          stacklevel=3)


def check_parts(objective: Objective, *, teacher: Any = None, transforms: Iterable[Any] = ()) -> None:
    """The Trainer's composition checks: every objective term against its Sampler, the whole
    objective against the teacher and against every Transform (and those nested in them)."""
    check_samplers(objective)
    if teacher is not None:
        check_composition(objective, teacher)
    seen: set[int] = set()
    for transform in transforms:
        parts = transform.modules() if isinstance(transform, nn.Module) else [transform]
        for part in parts:
            if isinstance(part, Transform) and id(part) not in seen:
                seen.add(id(part))
                check_composition(objective, part)


def check_samplers(objective: Objective) -> None:
    """Check every objective term inside ``objective`` (itself included) against its Sampler."""
    for term in objective.modules():
        sampler = getattr(term, "sampler", None)
        if isinstance(term, Objective) and isinstance(sampler, Sampler):
            check_composition(term, sampler)


def _check_weight(weight: Any) -> float | Schedule:
    if isinstance(weight, Schedule):
        return weight
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        return float(weight)
    raise TypeError(f"objective weight must be a number or an sdk Schedule, got {type(weight).__name__}")


class WeightedSum(Objective):
    """``sum_k w_k * L_k``; ``logs`` hold each term's value under its name (and its own logs as
    ``name/key``). A weight may be a Schedule of the training step. ``per_sample`` is the
    weighted sum of the terms' per-sample losses when every term provides one."""

    def __init__(self, terms: list[tuple[float | Schedule, Objective]]):
        super().__init__()
        self.weights: list[float | Schedule] = [_check_weight(w) for w, _ in terms]
        self.terms = nn.ModuleList([obj for _, obj in terms])
        self.step, self.max_steps = 0, None
        self._term_names = self._unique_names()
        for term in self.terms:
            check_samplers(term)

    @classmethod
    def of(cls, objective: Objective, weight: Any = 1.0) -> WeightedSum:
        if isinstance(objective, WeightedSum):
            w = _check_weight(weight)
            if isinstance(w, Schedule) and any(isinstance(x, Schedule) for x in objective.weights):
                raise TypeError("cannot multiply scheduled weights by another schedule")
            if isinstance(w, Schedule):
                return cls([(w, o) if x == 1.0 else (_Scaled(w, x), o)
                            for x, o in zip(objective.weights, objective.terms)])
            return cls([(_scale(x, w), o) for x, o in zip(objective.weights, objective.terms)])
        return cls([(weight, objective)])

    def __add__(self, other: Any) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        right = other if isinstance(other, WeightedSum) else WeightedSum.of(other)
        return WeightedSum(list(zip(self.weights, self.terms)) + list(zip(right.weights, right.terms)))

    @property
    def requires(self) -> dict[str, Any]:  # type: ignore[override]
        """The terms' requirements combined: the most views any term needs, every flag set."""
        merged: dict[str, Any] = {}
        for term in self.terms:
            for key, value in term.requires.items():
                if key == "views":
                    merged[key] = max(merged.get(key, 0), int(value))
                elif key == "extras":
                    merged[key] = tuple(sorted(set(merged.get(key, ())) | set(value)))
                else:
                    merged[key] = merged.get(key, False) or bool(value)
        return merged

    @property
    def consumes(self) -> frozenset[Input]:  # type: ignore[override]
        """What any term consumes."""
        return frozenset().union(*(term.consumes for term in self.terms))

    @property
    def accepts_unknown(self) -> bool:  # type: ignore[override]
        """Whether every term takes unknown-class rows (``-1`` ids): one that does not would
        refuse the batch."""
        return all(term.accepts_unknown for term in self.terms)

    @property
    def batch_coupled(self) -> bool:  # type: ignore[override]
        """Whether any term couples the samples of a batch."""
        return any(bool(term.batch_coupled) for term in self.terms)

    def caveats(self) -> dict[Input, str]:
        """The terms' caveats, each naming its term."""
        out: dict[Input, str] = {}
        for name, term in zip(self._term_names, self.terms):
            for item, why in term.caveats().items():
                out[item] = f"{out[item]}; " if item in out else ""
                out[item] += f"{name}: {why}"
        return out

    def _unique_names(self) -> list[str]:
        seen: dict[str, int] = {}
        names = []
        for term in self.terms:
            n = seen.get(term.name, 0)
            seen[term.name] = n + 1
            names.append(term.name if n == 0 else f"{term.name}_{n + 1}")
        return names

    def set_progress(self, step: int, max_steps: int | None) -> None:
        self.step, self.max_steps = step, max_steps
        for term in self.terms:
            term.set_progress(step, max_steps)

    def request_per_sample(self, wanted: bool) -> None:
        super().request_per_sample(wanted)
        for term in self.terms:
            term.request_per_sample(wanted)

    def current_weights(self) -> list[float]:
        return [w(self.step, self.max_steps) if isinstance(w, Schedule) else w for w in self.weights]

    def forward(self, views: Views, batch: Batch) -> Loss:
        total = None
        per_sample = None
        per_sample_ok = True
        logs: dict[str, torch.Tensor] = {}
        for name, w, term in zip(self._term_names, self.current_weights(), self.terms):
            loss = term(views, batch)
            contrib = w * loss.value
            total = contrib if total is None else total + contrib
            logs[name] = loss.value.detach()
            for key, value in loss.logs.items():
                logs[f"{name}/{key}"] = value
            if loss.per_sample is None or not self.per_sample_requested:
                per_sample_ok = False
            elif per_sample_ok:
                ps = w * loss.per_sample
                per_sample = ps if per_sample is None else per_sample + ps
        return Loss(value=total, per_sample=per_sample if per_sample_ok else None, logs=logs)

    def extra_repr(self) -> str:
        return " + ".join(f"{w} * {n}" for w, n in zip(self.weights, self._term_names))


def _scale(x: float | Schedule, w: float) -> float | Schedule:
    return x * w if isinstance(x, float) else _Scaled(x, w)


class _Scaled(Schedule):
    """A schedule times a constant (from ``c * (schedule_weighted_objective)``)."""

    def __init__(self, schedule: Schedule, factor: float):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step: int, max_steps: int | None = None) -> float:
        return self.factor * self.schedule(step, max_steps)
