"""Plugin discovery (pluggy + entry points), lookup, parameter validation and isolation."""

from __future__ import annotations

import difflib
import inspect
import threading
import typing
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy
from typeguard import TypeCheckError, check_type

from sdk import constraints, hookspecs
from sdk.card import KINDS, Card, Param
from sdk.errors import ConfigError, PluginConflictError, PluginNotFoundError

ENTRY_POINT_GROUP = "paperplug"


@attrs.frozen
class BrokenPlugin:
    """A plugin module that failed to load or register: its entry-point name, package, error."""

    name: str
    package: str
    error: str


@attrs.frozen
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    card: Card


def _signature_params(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter],
                                                               dict[str, Any], bool]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: skip type checks, keep names
        hints = {}
    params = {}
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            params[p.name] = p
    return params, hints, var_kw


def _type_name(hint: Any) -> str:
    if hint is inspect.Parameter.empty:
        return "any"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def describe_params(factory: Callable[..., Any]) -> tuple[Param, ...]:
    params, hints, _ = _signature_params(factory)
    rules = constraints.constraints(factory)
    out = []
    for name, p in params.items():
        hint = hints.get(name, p.annotation)
        default = attrs.NOTHING if p.default is p.empty else p.default
        rule = rules.get(name)
        out.append(Param(name=name, type=_type_name(hint), default=default,
                         constraint=rule.text() if rule else ""))
    return tuple(out)


def family_of(module: str) -> str:
    """The family of a built-in plugin module ``plugins.<family>.<name>``; ``""`` otherwise."""
    parts = module.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "plugins" else ""


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class Registry:
    """All plugins by kind and name. ``sdk.get_registry()`` returns the global one.

    A registry bound to an entry-point ``group`` discovers on demand: looking up ``(kind,
    name)`` loads the entry points called ``name`` (a built-in plugin's entry point bears its
    name) and, once one provides the plugin, the entry points of every *other* distribution, so
    a second package registering that name is still reported as a conflict; it loads every entry
    point when none called ``name`` provides the plugin. Listing cards or broken plugins loads
    every entry point. An unbound registry holds what is added.
    """

    def __init__(self, group: str | None = None) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}
        self._conflicts: dict[tuple[str, str], list[str]] = {}
        self._broken: list[BrokenPlugin] = []
        self._package = ""
        self._family = ""
        self._group = group
        self._loaded: set[tuple[str, str, str]] = set()
        self._complete = group is None
        self._lock = threading.RLock()
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Plugin modules that failed to load or register (name, package, error)."""
        self._discover()
        return self._broken

    def _discover(self) -> None:
        if not self._complete:
            self.load_entry_points(self._group)
            self._complete = True

    # registration --------------------------------------------------------------
    def add(self, factory: Callable[..., Any], *, card: Card) -> None:
        """Register ``factory`` (a class or function) as the plugin the card describes: its kind
        and name are the card's, ``registry.add(MyLoss, card=CARD)``."""
        if not isinstance(card, Card):
            raise TypeError(f"registry.add({factory!r}): card must be sdk.Card, "
                            f"got {type(card).__name__}; call registry.add(factory, card=CARD)")
        kind, name = card.kind, card.name
        if not callable(factory):
            raise TypeError(f"registry.add({kind!r} plugin {name!r}): factory is not callable")
        card = attrs.evolve(card, params=describe_params(factory), package=self._package,
                            family=self._family or self._package)
        key = (kind, name)
        if key in self._entries:
            first = self._entries[key].card.package or "<unknown package>"
            second = self._package or "<unknown package>"
            self._conflicts.setdefault(key, [first]).append(second)
            raise PluginConflictError(
                f"{kind} plugin {name!r} is registered twice: by package {first!r} and by "
                f"package {second!r}; uninstall one of them")
        self._entries[key] = Entry(kind, name, factory, card)
        constraints.name_plugin(factory, name)

    # lookup --------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise PluginNotFoundError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}."
                                      + _suggest(kind, KINDS))
        key = (kind, name)
        if key not in self._entries and key not in self._conflicts and not self._complete:
            self._load_for(key)
        if key in self._conflicts:
            packages = " and ".join(repr(p) for p in self._conflicts[key])
            raise PluginConflictError(f"{kind} plugin {name!r} is provided by several packages "
                                      f"({packages}); uninstall all but one")
        if key not in self._entries:
            names = sorted(n for k, n in self._entries if k == kind)
            other = sorted(k for k, n in self._entries if n == name)
            hint = f" (there is a {other[0]} plugin of that name)" if other else ""
            raise PluginNotFoundError(
                f"no {kind} plugin named {name!r}{hint}." + _suggest(name, names)
                + f" Available {kind} plugins: {', '.join(names) or 'none'}")
        return self._entries[key]

    def cards(self, kind: str | None = None) -> list[Card]:
        if kind is not None and kind not in KINDS:
            raise PluginNotFoundError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}."
                                      + _suggest(kind, KINDS))
        self._discover()
        return [e.card for (k, _), e in sorted(self._entries.items()) if kind in (None, k)]

    def validate(self, kind: str, name: str, params: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` for an unknown, ill-typed or out-of-constraint parameter."""
        factory = self.get(kind, name).factory
        accepted, hints, var_kw = _signature_params(factory)
        for key, value in params.items():
            if key not in accepted:
                if var_kw:
                    continue
                raise ConfigError(
                    f"{kind} plugin {name!r} has no parameter {key!r}." + _suggest(key, accepted)
                    + f" Accepted: {', '.join(accepted) or 'none'}", param=key)
            hint = hints.get(key)
            if hint is None:
                continue
            try:
                check_type(value, hint)
            except TypeCheckError as exc:
                raise ConfigError(
                    f"{kind} plugin {name!r}: parameter {key!r} expected {_type_name(hint)}, "
                    f"got {value!r} ({type(value).__name__}): {exc}", param=key) from None
        constraints.check(name, constraints.constraints(factory), params)
        missing = [n for n, p in accepted.items() if p.default is p.empty and n not in params]
        if missing:
            raise ConfigError(f"{kind} plugin {name!r}: missing required parameter "
                              f"{missing[0]!r}", param=missing[0])

    def create(self, kind: str, name: str, **params: Any) -> Any:
        """Build plugin ``name`` of ``kind`` with validated ``params``."""
        self.validate(kind, name, params)
        instance = self.get(kind, name).factory(**params)
        if kind == "objective":
            instance.name = name
        return instance

    # discovery -----------------------------------------------------------------
    def load_entry_points(self, group: str | None = ENTRY_POINT_GROUP, *,
                          name: str | None = None) -> None:
        """Import each module of the entry-point group (only those called ``name`` if given)
        not loaded yet and call its ``paperplug_register``.

        A module that fails to import or to register is recorded in :attr:`broken` (name,
        package, error) and skipped; the others are unaffected.
        """
        found = (metadata.entry_points(group=group) if name is None
                 else metadata.entry_points(group=group, name=name))
        with self._lock:
            for ep in sorted(found, key=lambda e: e.name):
                self._load(ep)

    def _load_for(self, key: tuple[str, str]) -> None:
        """Load the entry points called ``key[1]``, then every entry point of the other
        distributions (only another package can register the same name, and then both are
        reported); load everything when no entry point of that name provides the plugin."""
        everything = metadata.entry_points(group=self._group)
        with self._lock:
            for ep in sorted(everything.select(name=key[1]), key=lambda e: e.name):
                self._load(ep)
            if key not in self._entries and key not in self._conflicts:
                return self._discover()
            package = self._entries[key].card.package if key in self._entries else None
            for ep in sorted(everything, key=lambda e: e.name):
                if (ep.dist.name if ep.dist is not None else None) != package:
                    self._load(ep)

    def _load(self, ep: metadata.EntryPoint) -> None:
        package = ep.dist.name if ep.dist is not None else "<unknown package>"
        key = (package, ep.name, ep.value)
        if key in self._loaded:
            return
        self._loaded.add(key)
        try:
            module = ep.load()
            self.plugin_manager.register(module, name=f"{package}:{ep.name}")
        except Exception as exc:  # noqa: BLE001 - isolate any failure of a third party
            self._broken.append(BrokenPlugin(ep.name, package, f"{type(exc).__name__}: {exc}"))
            return
        self.register_module(module, name=ep.name, package=package)

    def register_module(self, module: Any, *, name: str, package: str = "") -> None:
        """Call one plugin object's ``paperplug_register`` hook, isolating its failures."""
        hook = getattr(module, "paperplug_register", None)
        if hook is None:
            self._broken.append(BrokenPlugin(name, package, "defines no paperplug_register hook"))
            return
        self._package = package
        self._family = family_of(getattr(module, "__name__", ""))
        try:
            hook(registry=self)
        except Exception as exc:  # noqa: BLE001
            self._broken.append(BrokenPlugin(name, package, f"{type(exc).__name__}: {exc}"))
        finally:
            self._package = self._family = ""


_GLOBAL: Registry | None = None
_LOCK = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry of the ``paperplug`` entry points, loaded as lookups need."""
    global _GLOBAL
    if _GLOBAL is None:
        with _LOCK:
            if _GLOBAL is None:
                _GLOBAL = Registry(ENTRY_POINT_GROUP)
    return _GLOBAL


def reset() -> None:
    """Forget the discovered plugins (the next lookup discovers again)."""
    global _GLOBAL
    _GLOBAL = None


def create(kind: str, name: str, **params: Any) -> Any:
    """Build plugin ``name`` of ``kind``: ``sdk.create("objective", "barlow_twins", lambd=5e-3)``."""
    return get_registry().create(kind, name, **params)


def plugins(kind: str | None = None) -> list[Card]:
    """Cards of the registered plugins, optionally of one kind."""
    return get_registry().cards(kind)


def broken_plugins() -> list[BrokenPlugin]:
    """Plugin modules that failed to import or register, with their errors."""
    return list(get_registry().broken)
