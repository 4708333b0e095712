"""Declared parameter constraints: parsing, messages, both construction paths, cards and docs."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from typing import Annotated

import pytest
from annotated_types import Ge, Gt, Interval, Le, Len, Lt, MaxLen, MinLen, MultipleOf, Predicate

import sdk
from sdk import constraints
from sdk.card import Card
from sdk.constraints import one_of, rule_of
from sdk.interfaces import Metric, Objective
from sdk.registry import Registry


class FromData:
    """Annotated metadata that is not a constraint (like a build-context marker)."""

    def __init__(self, key: str):
        self.key = key


def _text(hint) -> str:
    return rule_of(hint).text()


@pytest.mark.parametrize("hint,text", [
    (Annotated[float, Gt(0)], "> 0"),
    (Annotated[float, Ge(0.5)], ">= 0.5"),
    (Annotated[int, Lt(3)], "< 3"),
    (Annotated[int, Le(3)], "<= 3"),
    (Annotated[float, Interval(ge=0, lt=1)], "in [0, 1)"),
    (Annotated[float, Interval(gt=0, le=1)], "in (0, 1]"),
    (Annotated[int, MultipleOf(8)], "a multiple of 8"),
    (Annotated[tuple, MinLen(1)], "of length >= 1"),
    (Annotated[tuple, MaxLen(4)], "of length <= 4"),
    (Annotated[tuple, Len(2, 3)], "of length in [2, 3]"),
    (Annotated[str, one_of(("sum", "vote"))], "one of 'sum', 'vote'"),
    (Annotated[float, Predicate(math.isfinite)], "satisfying isfinite"),
    (Annotated[float, Gt(0)] | None, "> 0"),
    (Annotated[float | None, Gt(0)], "> 0"),
    (tuple[Annotated[int, Ge(1)], ...], "made of elements >= 1"),
    (Annotated[Sequence[Annotated[int, Ge(1)]], MinLen(1)], "of length >= 1 with elements >= 1"),
    (tuple[Annotated[int, Ge(1)], Annotated[int, Ge(1)]], "made of elements >= 1"),
    (Annotated[float, FromData("x"), Gt(0)], "> 0"),
])
def test_rule_text(hint, text):
    assert _text(hint) == text


@pytest.mark.parametrize("hint", [float, int | None, Annotated[float, FromData("labels")],
                                  tuple[int, ...], tuple[Annotated[int, Ge(1)], int]])
def test_no_constraint_declared(hint):
    assert rule_of(hint) is None


@pytest.mark.parametrize("hint,good,bad", [
    (Annotated[float, Gt(0)], [1e-9, 3], [0, -1.0, "x"]),
    (Annotated[float, Interval(ge=0, lt=1)], [0, 0.999], [1, -0.1]),
    (Annotated[int, MultipleOf(4)], [0, 8], [6]),
    (Annotated[tuple, Len(2, 3)], [(1, 2), (1, 2, 3)], [(1,), (1, 2, 3, 4)]),
    (Annotated[str, one_of(("a", "b"))], ["a"], ["c"]),
    (Annotated[float, Predicate(math.isfinite)], [1.0], [math.inf]),
    (Annotated[float, Gt(0)] | None, [None, 2.0], [0.0]),
    (Annotated[Sequence[Annotated[int, Ge(1)]], MinLen(1)], [(1, 2), [3]], [(), (1, 0)]),
])
def test_rule_checks_values(hint, good, bad):
    rule = rule_of(hint)
    assert all(rule.ok(v) for v in good) and not any(rule.ok(v) for v in bad)


class Scaled(Objective):
    """A third party's objective: constrained parameters and a non-constraint marker."""

    requires = {"views": 1}

    def __init__(self, scale: Annotated[float, Gt(0)] = 1.0,
                 share: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 labels: Annotated[object | None, FromData("labels")] = None):
        super().__init__()
        self.scale, self.share = scale, share

    def forward(self, views, batch):
        return sdk.Loss(value=self.scale * views.embeddings[0].sum())


class Bare(Scaled):
    """Inherits Scaled's signature without an ``__init__`` of its own."""


SCALED = Card(name="scaled", kind="objective", title="t", summary="s")


def _registry() -> Registry:
    reg = Registry()
    reg.add(Scaled, card=SCALED)
    return reg


def test_create_names_plugin_parameter_constraint_and_value():
    reg = _registry()
    with pytest.raises(sdk.ConfigError) as info:
        reg.create("objective", "scaled", scale=0.0)
    assert str(info.value) == "scaled: scale must be > 0, got 0.0" and info.value.param == "scale"
    with pytest.raises(sdk.ConfigError, match=r"^scaled: share must be in \[0, 1\], got 1.5$"):
        reg.create("objective", "scaled", share=1.5)
    assert reg.create("objective", "scaled", scale=2.0, share=1, labels="anything").scale == 2.0


def test_direct_construction_checks_the_same_constraints():
    class Local(Objective):
        def __init__(self, width: Annotated[int, Ge(1)] = 4, *, ratio: Annotated[float, Lt(1)] = 0.5):
            super().__init__()

        def forward(self, views, batch):
            raise AssertionError

    with pytest.raises(sdk.ConfigError, match=r"^Local: width must be >= 1, got 0$") as info:
        Local(0)  # positional, named by its class: no card is registered for it
    assert info.value.param == "width"
    with pytest.raises(sdk.ConfigError, match=r"^Local: ratio must be < 1, got 1$"):
        Local(ratio=1)
    assert isinstance(Local(2, ratio=0.1), Local)
    _registry()  # added by hand, not from an entry point: still named by its class
    with pytest.raises(sdk.ConfigError, match=r"^Scaled: scale must be > 0, got -1$"):
        Scaled(scale=-1)
    from sdk.contrastive import NTXent

    sdk.get_registry().get("objective", "nt_xent")  # registered from its entry point
    with pytest.raises(sdk.ConfigError, match=r"^nt_xent: temperature must be > 0, got 0$"):
        NTXent(temperature=0)


def test_an_inherited_signature_is_checked_and_bases_are_checked_once():
    with pytest.raises(sdk.ConfigError, match=r"^Bare: scale must be > 0, got 0$"):
        Bare(scale=0)

    class Wrapper(Scaled):  # passes a valid value on: only its own signature is checked
        def __init__(self, factor: Annotated[float, Ge(2)] = 2.0):
            super().__init__(scale=factor)

    with pytest.raises(sdk.ConfigError, match=r"^Wrapper: factor must be >= 2, got 1$"):
        Wrapper(factor=1)
    assert Wrapper(factor=3).scale == 3


def test_non_module_interfaces_check_too():
    class Counter(Metric):
        def __init__(self, k: Annotated[int, Ge(1)] = 1):
            self.k = k

        def update(self, *args, **kwargs): ...
        def compute(self): return 0.0
        def reset(self): ...

    with pytest.raises(sdk.ConfigError, match=r"^Counter: k must be >= 1, got 0$"):
        Counter(k=0)


def test_function_factories_are_checked_by_the_registry():
    def make(size: Annotated[int, MultipleOf(2)] = 2):
        return size

    reg = Registry()
    reg.add(make, card=Card(name="even", kind="metric", title="t", summary="s"))
    with pytest.raises(sdk.ConfigError, match=r"^even: size must be a multiple of 2, got 3$"):
        reg.create("metric", "even", size=3)


def test_card_shows_the_constraint():
    card = _registry().cards()[0]
    params = {p.name: p for p in card.params}
    assert params["scale"].constraint == "> 0" and params["scale"].type == "float"
    assert params["share"].constraint == "in [0, 1]"
    assert params["labels"].constraint == ""


def test_builtin_cards_and_docs_pages_show_constraints():
    card = next(c for c in sdk.plugins("objective") if c.name == "nt_xent")
    assert {p.name: p.constraint for p in card.params}["temperature"] == "> 0"
    from tests.test_docs import plugin_pages

    page = plugin_pages.card_page(card)
    assert "| parameter | type | default | constraint |" in page
    assert "| `temperature` | `float` | `0.5` | `> 0` |" in page


def test_cli_show_prints_the_constraint():
    out = subprocess.run([sys.executable, "-m", "sdk.cli", "plugins", "show", "memory_bank"],
                         capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    row = next(line for line in out.splitlines() if "momentum " in line and "float" in line)
    assert "0.5" in row and "in [0, 1)" in row


def _violations(rule: constraints.Rule, default: object = None) -> list[object]:
    """Values that break ``rule``: one per constraint on the value, and per element constraint
    the default with its first element replaced by a violating one."""
    out = []
    for c in rule.value:
        if isinstance(c, Gt):
            out.append(c.gt)
        elif isinstance(c, Ge):
            out.append(c.ge - 1)
        elif isinstance(c, Lt):
            out.append(c.lt)
        elif isinstance(c, Le):
            out.append(c.le + 1)
        elif isinstance(c, MinLen):
            out.append((1,) * (c.min_length - 1))
        elif isinstance(c, MaxLen):
            out.append((1,) * (c.max_length + 1))
        elif isinstance(c, Predicate):
            out.append("not-a-choice")
        else:
            raise AssertionError(f"no violating value for {c!r}")
    if default is None:  # a valid shape of ones: as long as the value constraints require
        default = (1,) * max([1, *(c.min_length for c in rule.value if isinstance(c, MinLen))])
    for c in rule.each:
        bad = _violations(constraints.Rule(value=(c,)))[0]
        out.append(type(default)([bad, *list(default)[1:]]))
    return out


BUILTIN = [(c.kind, c.name, p.name) for c in sdk.plugins() if c.package == "paperplug"
           for p in c.params if p.constraint]


def test_builtins_declare_constraints():
    assert len(BUILTIN) >= 90


@pytest.mark.parametrize("kind,name,param", BUILTIN)
def test_every_declared_builtin_constraint_is_enforced(kind, name, param):
    """For each declared constraint, a violating value raises ConfigError from sdk.create (before
    any construction) and from direct construction, naming plugin, parameter and value; the
    default satisfies it."""
    factory = sdk.get_registry().get(kind, name).factory
    rule = constraints.declared(factory)[param]
    default = next(p for p in sdk.get_registry().get(kind, name).card.params if p.name == param)
    assert default.required or rule.ok(default.default)
    for bad in _violations(rule, default.default):
        for build in (lambda **kw: sdk.create(kind, name, **kw), factory):
            with pytest.raises(sdk.ConfigError) as info:
                build(**{param: bad})
            assert info.value.param == param
            assert str(info.value).startswith(f"{name}: {param} must be {rule.text()}, got ")


def test_a_callable_object_factory_is_checked():
    class Maker:
        __slots__ = ()  # no weak references: parsed on each use

        def __call__(self, n: Annotated[int, Ge(1)] = 1):
            return n

    reg = Registry()
    reg.add(Maker(), card=Card(name="maker", kind="metric", title="t", summary="s"))
    assert reg.create("metric", "maker", n=2) == 2
    with pytest.raises(sdk.ConfigError, match=r"^maker: n must be >= 1, got 0$"):
        reg.create("metric", "maker", n=0)
