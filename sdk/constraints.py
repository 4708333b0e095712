"""Parameter constraints declared in signatures with annotated-types, read and checked here.

A plugin declares ``temperature: Annotated[float, Gt(0)] = 0.5``. The registry checks the values
given to ``sdk.create`` (:func:`check`) and the interface base classes check direct construction
(:class:`Constrained`); both raise :class:`~sdk.errors.ConfigError` naming the plugin, the
parameter, the constraint and the value. Understood: ``Gt``, ``Ge``, ``Lt``, ``Le``,
``Interval``, ``MultipleOf``, ``MinLen``, ``MaxLen``, ``Len`` and ``Predicate`` (described by its
function's ``description`` attribute, else its name; :func:`one_of` makes one). Other
``Annotated`` metadata is not a constraint and is ignored. A constraint applies to the value
(also inside ``X | None``; ``None`` is never checked) or, written on the element type of a
``tuple[X, ...]``/``list[X]``/``Sequence[X]`` (or on every element of a fixed-length tuple),
to every element.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import annotated_types as at
import attrs

from sdk.errors import ConfigError

_BOUNDS = {at.Gt: (">", "gt"), at.Ge: (">=", "ge"), at.Lt: ("<", "lt"), at.Le: ("<=", "le")}
_LOWER, _UPPER = (at.Gt, at.Ge), (at.Lt, at.Le)


@attrs.frozen
class Rule:
    """The constraints of one parameter: on its value and on each of its elements."""

    value: tuple[at.BaseMetadata, ...] = ()
    each: tuple[at.BaseMetadata, ...] = ()

    def ok(self, value: Any) -> bool:
        if value is None:
            return True
        try:
            return (all(holds(c, value) for c in self.value)
                    and all(holds(c, v) for c in self.each for v in value))
        except TypeError:  # a value of the wrong type cannot satisfy the constraint
            return False

    def text(self) -> str:
        """Readable form: ``> 0``, ``in [0, 1)``, ``of length >= 1 with elements >= 1``."""
        parts = [_describe(self.value)] if self.value else []
        if self.each:
            parts.append(f"{'with' if parts else 'made of'} elements {_describe(self.each)}")
        return " ".join(parts)


class _OneOf:
    """Membership in a fixed set of choices, as a described predicate function."""

    def __init__(self, choices: Iterable[Any]):
        self.choices = tuple(choices)
        self.description = "one of " + ", ".join(repr(c) for c in self.choices)
        self.__name__ = "one_of"

    def __call__(self, value: Any) -> bool:
        return value in self.choices

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _OneOf) and other.choices == self.choices

    def __hash__(self) -> int:
        return hash(self.choices)


def one_of(choices: Iterable[Any]) -> at.Predicate:
    """``Annotated[str, one_of(("sum", "vote"))]``: the value is one of ``choices``."""
    return at.Predicate(_OneOf(choices))


def holds(c: at.BaseMetadata, v: Any) -> bool:
    """Whether ``v`` satisfies the one constraint ``c``."""
    if isinstance(c, at.Gt):
        return v > c.gt
    if isinstance(c, at.Ge):
        return v >= c.ge
    if isinstance(c, at.Lt):
        return v < c.lt
    if isinstance(c, at.Le):
        return v <= c.le
    if isinstance(c, at.MultipleOf):
        return v % c.multiple_of == 0
    if isinstance(c, at.MinLen):
        return len(v) >= c.min_length
    if isinstance(c, at.MaxLen):
        return len(v) <= c.max_length
    if isinstance(c, at.Predicate):
        return bool(c.func(v))
    raise TypeError(f"unsupported constraint {c!r}")


def _bound(c: at.BaseMetadata) -> Any:
    return getattr(c, _BOUNDS[type(c)][1])


def _describe(constraints: tuple[at.BaseMetadata, ...]) -> str:
    lower = [c for c in constraints if isinstance(c, _LOWER)]
    upper = [c for c in constraints if isinstance(c, _UPPER)]
    parts = []
    if len(lower) == 1 and len(upper) == 1:
        lo, hi = lower[0], upper[0]
        parts.append(f"in {'(' if isinstance(lo, at.Gt) else '['}{_bound(lo)!r}, "
                     f"{_bound(hi)!r}{')' if isinstance(hi, at.Lt) else ']'}")
    else:
        parts += [f"{_BOUNDS[type(c)][0]} {_bound(c)!r}" for c in (*lower, *upper)]
    min_len = [c.min_length for c in constraints if isinstance(c, at.MinLen)]
    max_len = [c.max_length for c in constraints if isinstance(c, at.MaxLen)]
    if min_len and max_len:
        parts.append(f"of length in [{min_len[0]}, {max_len[0]}]")
    else:
        parts += [f"of length >= {n}" for n in min_len] + [f"of length <= {n}" for n in max_len]
    for c in constraints:
        if isinstance(c, at.MultipleOf):
            parts.append(f"a multiple of {c.multiple_of!r}")
        elif isinstance(c, at.Predicate):
            parts.append(getattr(c.func, "description", None)
                         or f"satisfying {getattr(c.func, '__name__', repr(c.func))}")
    return " and ".join(parts)


def describe(constraint: at.BaseMetadata) -> str:
    """Readable form of one constraint: ``>= 1``, ``one of 'a', 'b'``."""
    return _describe((constraint,))


def _metadata(hint: Any) -> tuple[at.BaseMetadata, ...]:
    """The annotated-types constraints of an ``Annotated`` hint (grouped ones expanded)."""
    out: list[at.BaseMetadata] = []
    for m in getattr(hint, "__metadata__", ()):
        if isinstance(m, at.GroupedMetadata):
            out += [c for c in m if isinstance(c, at.BaseMetadata)]
        elif isinstance(m, at.BaseMetadata):
            out.append(m)
    return tuple(out)


def rule_of(hint: Any) -> Rule | None:
    """The :class:`Rule` a type hint declares, or None when it declares no constraint."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        inner = rule_of(hint.__origin__)
        value = _metadata(hint)
        if not value and inner is None:
            return None
        return Rule(value=value + (inner.value if inner else ()), each=inner.each if inner else ())
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # the members' common rule
        rules = {r for r in map(rule_of, args) if r is not None}
        return rules.pop() if len(rules) == 1 else None
    if origin is tuple and args[-1:] == (Ellipsis,):
        args = args[:-1]
    elif origin not in (tuple, list, Sequence, set, frozenset):
        return None
    elements = {rule_of(a) for a in args}  # one rule that every element declares
    element = elements.pop() if len(elements) == 1 else None
    return Rule(each=element.value) if element is not None and element.value else None


_CACHE: weakref.WeakKeyDictionary[Any, tuple[inspect.Signature, dict[str, Rule]]] = (
    weakref.WeakKeyDictionary())
_NAMES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _parsed(factory: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Rule]]:
    try:
        return _CACHE[factory]
    except (KeyError, TypeError):  # not parsed yet, or not weakly referenceable
        pass
    target = (factory.__init__ if inspect.isclass(factory) else factory if inspect.isroutine(factory)
              else type(factory).__call__)  # a callable object: its class's __call__
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations declare nothing we can read
        hints = {}
    rules = {name: r for name, hint in hints.items() if (r := rule_of(hint)) is not None}
    parsed = inspect.signature(factory), rules
    try:
        _CACHE[factory] = parsed
    except TypeError:  # a callable that cannot be weakly referenced is parsed on every use
        pass
    return parsed


def declared(factory: Callable[..., Any]) -> dict[str, Rule]:
    """Declared constraints of a factory's parameters (``__init__``'s for a class), cached."""
    return _parsed(factory)[1]


def name_plugin(factory: Callable[..., Any], name: str) -> None:
    """Record the card name of a factory registered from an entry point, for the messages of
    direct construction."""
    try:
        _NAMES[factory] = name
    except TypeError:  # not weakly referenceable: only the registry's own messages name it
        pass


def plugin_name(factory: Callable[..., Any]) -> str:
    """The card name of a factory registered from an entry point, else its (class) name."""
    try:
        name = _NAMES.get(factory)
    except TypeError:  # not weakly referenceable, so never recorded
        name = None
    return name or getattr(factory, "__name__", repr(factory))


def check(plugin: str, rules: Mapping[str, Rule], params: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first value of ``params`` that breaks its rule."""
    for key, value in params.items():
        rule = rules.get(key)
        if rule is not None and not rule.ok(value):
            raise ConfigError(f"{plugin}: {key} must be {rule.text()}, got {value!r}", param=key)


def _checked_init(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        if (args or kwargs) and cls.__init__ is __init__:  # the outermost __init__ only
            sig, rules = _parsed(cls)
            if rules:
                check(plugin_name(cls), rules, sig.bind_partial(*args, **kwargs).arguments)
        init(self, *args, **kwargs)

    __init__.__constrained__ = True
    return __init__


class Constrained:
    """Base of the plugin interfaces: instantiating a subclass directly checks the constraints
    declared in its ``__init__`` signature (as ``sdk.create`` does)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__constrained__", False):
            cls.__init__ = _checked_init(init)
