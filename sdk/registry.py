"""Plugin discovery (pluggy + entry points), lookup, parameter validation and isolation."""

from __future__ import annotations

import difflib
import inspect
import threading
import typing
import weakref
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

import attrs
import pluggy
from typeguard import TypeCheckError, check_type

from sdk import constraints, hookspecs
from sdk.card import KINDS, Card, Param
from sdk.card_index import CardIndex, index_path, source_files
from sdk.context import data_params
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
    """A registered plugin. ``source`` names the entry point that registered it; ``factory`` is
    None while only its card is known (read from the card index, module not imported yet)."""

    kind: str
    name: str
    factory: Callable[..., Any] | None
    card: Card
    source: str = ""


_SIGNATURES: weakref.WeakKeyDictionary[Any, tuple[dict[str, inspect.Parameter], dict[str, Any],
                                                   bool]] = weakref.WeakKeyDictionary()


def _signature_params(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter],
                                                               dict[str, Any], bool]:
    """A factory's parameters (by name), their type hints and whether it takes ``**kwargs``;
    cached per factory (every ``create`` reads them; resolving the hints is the slow part)."""
    try:
        return _SIGNATURES[factory]
    except (KeyError, TypeError):  # not read yet, or not weakly referenceable
        pass
    parsed = _read_signature(factory)
    try:
        _SIGNATURES[factory] = parsed
    except TypeError:  # a callable that cannot be weakly referenced is read on every use
        pass
    return parsed


def _read_signature(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter],
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
    marked = data_params(factory)
    rules = constraints.declared(factory)
    out = []
    for name, p in params.items():
        hint = hints.get(name, p.annotation)
        default = attrs.NOTHING if p.default is p.empty else p.default
        rule = rules.get(name)
        out.append(Param(name=name, type=_type_name(hint), default=default,
                         from_data=marked.get(name, ""), constraint=rule.text() if rule else ""))
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

    A registry bound to an entry-point ``group`` discovers on demand, helped by the card index
    (:mod:`sdk.card_index`: what each entry point registered, while its files are unchanged).
    Looking up ``(kind, name)`` imports only the entry points that provide it (by the index) and
    those the index cannot vouch for (new, changed or broken), so two packages registering one
    name are still both loaded and reported; when none provides it, every entry point is
    loaded. Listing cards or broken plugins takes indexed cards from the index and imports the
    rest. An unbound registry holds what is added.
    """

    def __init__(self, group: str | None = None) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}
        self._conflicts: dict[tuple[str, str], list[str]] = {}
        self._broken: list[BrokenPlugin] = []
        self._package = ""
        self._family = ""
        self._source = ""
        self._added: list[Entry] = []
        self._group = group
        self._loaded: set[str] = set()
        self._eps: dict[str, metadata.EntryPoint] | None = None
        self._index: CardIndex | None = None
        self._complete = group is None
        self._lock = threading.RLock()
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Plugin modules that failed to load or register (name, package, error)."""
        self._discover()
        return self._broken

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
        entry = Entry(kind, name, factory, card, self._source)
        self._put(entry)
        if self._source:  # from an entry point: its card names the class in direct construction
            self._added.append(entry)
            constraints.name_plugin(factory, name)

    def _put(self, entry: Entry) -> None:
        """Store an entry; a second one of the same kind and name is a conflict (except the
        module whose indexed card it was, now imported)."""
        key = (entry.kind, entry.name)
        old = self._entries.get(key)
        if old is not None and not (old.factory is None and old.source == entry.source):
            first = old.card.package or "<unknown package>"
            second = entry.card.package or "<unknown package>"
            self._conflicts.setdefault(key, [first]).append(second)
            raise PluginConflictError(
                f"{entry.kind} plugin {entry.name!r} is registered twice: by package {first!r} "
                f"and by package {second!r}; uninstall one of them")
        self._entries[key] = entry

    # lookup --------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise PluginNotFoundError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}."
                                      + _suggest(kind, KINDS))
        key = (kind, name)
        if key not in self._conflicts and not self._complete and key not in self._entries:
            self._load_for(key)
        if key in self._entries and self._entries[key].factory is None:
            with self._lock:
                self._import(self._entries[key].source)
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
        constraints.check(name, constraints.declared(factory), params)
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
        elif hasattr(instance, "__dict__"):
            instance._plugin_name = name  # names it in composition errors and PluginFailure
        if kind == "objective":
            from sdk.compose import check_composition
            from sdk.interfaces import Sampler, Teacher, Transform

            for value in params.values():
                if isinstance(value, (Sampler, Teacher, Transform)):
                    check_composition(instance, value)
        return instance

    # discovery -----------------------------------------------------------------
    def load_entry_points(self, group: str | None = ENTRY_POINT_GROUP) -> None:
        """Import every module of the entry-point group not imported yet and call its
        ``paperplug_register``.

        A module that fails to import or to register is recorded in :attr:`broken` (name,
        package, error) and skipped; the others are unaffected.
        """
        with self._lock:
            for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
                self._load(ep)

    def _scan(self) -> dict[str, metadata.EntryPoint]:
        """The group's entry points by key (read once), their versions and the card index."""
        if self._eps is None:
            dists: dict[int, tuple[str, str | None]] = {}  # reading a name parses the metadata
            self._eps, self._packages, self._versions = {}, {}, {}
            for ep in sorted(metadata.entry_points(group=self._group), key=lambda e: e.name):
                if id(ep.dist) not in dists:
                    dists[id(ep.dist)] = ((ep.dist.name, ep.dist.version) if ep.dist is not None
                                          else ("<unknown package>", None))
                package, version = dists[id(ep.dist)]
                key = CardIndex.key(package, ep.name, ep.value)
                self._eps[key], self._packages[key], self._versions[key] = ep, package, version
            self._index = CardIndex(index_path())
        return self._eps

    def _load_for(self, key: tuple[str, str]) -> None:
        """Import the entry points that provide ``key`` or that the index cannot vouch for;
        everything when none provides it."""
        with self._lock:
            for source in self._scan():
                provides = self._index.plugins(source, self._versions[source])
                if provides is None or key in provides:
                    self._import(source)
            if key not in self._entries and key not in self._conflicts:
                self._discover()
            self._index.save()

    def _discover(self) -> None:
        """Every entry point: indexed cards from the index, the other modules imported."""
        if self._complete:
            return
        with self._lock:
            for source, ep in self._scan().items():
                if source in self._loaded:
                    continue
                cards = self._index.cards(source, self._versions[source])
                if cards is None:
                    self._import(source)
                    continue
                self._loaded.add(source)
                try:
                    for card in cards:
                        self._put(Entry(card.kind, card.name, None, card, source))
                except PluginConflictError as exc:
                    self._broken.append(BrokenPlugin(ep.name, self._packages[source],
                                                     f"PluginConflictError: {exc}"))
            self._complete = True
            self._index.save()

    def _import(self, source: str) -> None:
        """Import one entry point's module (even if its cards came from the index) and record
        what it registered in the index."""
        ep = self._scan()[source]
        if source in self._loaded and not any(e.source == source and e.factory is None
                                              for e in self._entries.values()):
            return
        self._loaded.add(source)
        self._added = []
        module = self._load(ep, force=True, package=self._packages[source])
        if module is not None:
            added = [e for e in self._added if e.source == source]
            self._index.record(source, self._versions[source], [e.card for e in added],
                               source_files(module, [e.factory for e in added]))

    def _load(self, ep: metadata.EntryPoint, *, force: bool = False,
              package: str | None = None) -> Any:
        """Import an entry point and register its module; the module, or None if it failed."""
        package = _package(ep) if package is None else package
        key = CardIndex.key(package, ep.name, ep.value)
        if key in self._loaded and not force:
            return None
        self._loaded.add(key)
        try:
            module = ep.load()
            self.plugin_manager.register(module, name=f"{package}:{ep.name}")
        except Exception as exc:  # noqa: BLE001 - isolate any failure of a third party
            self._broken.append(BrokenPlugin(ep.name, package, f"{type(exc).__name__}: {exc}"))
            return None
        self._source = key
        try:
            ok = self.register_module(module, name=ep.name, package=package)
        finally:
            self._source = ""
        return module if ok else None

    def register_module(self, module: Any, *, name: str, package: str = "") -> bool:
        """Call one plugin object's ``paperplug_register`` hook, isolating its failures; whether
        it succeeded."""
        hook = getattr(module, "paperplug_register", None)
        if hook is None:
            self._broken.append(BrokenPlugin(name, package, "defines no paperplug_register hook"))
            return False
        self._package = package
        self._family = family_of(getattr(module, "__name__", ""))
        try:
            hook(registry=self)
        except Exception as exc:  # noqa: BLE001
            self._broken.append(BrokenPlugin(name, package, f"{type(exc).__name__}: {exc}"))
            return False
        finally:
            self._package = self._family = ""
        return True


def _package(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "<unknown package>"


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
