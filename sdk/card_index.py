"""The card index: what each entry point registered, kept in a JSON file so a fresh process can
list every card, and find which entry points provide a plugin, without importing them.

A record holds an entry point's plugins (kind and name), its cards (JSON text, decoded only
when cards are listed) and the files they were read from (its module, the
modules its namespace refers to, the modules of each factory's classes), each with its
modification time and size, and the distribution's version. A record is used only while all of
these are unchanged, and the whole index only while the registry's own modules (``card``,
``constraints``, ``registry``) are; anything else is loaded by importing, and recorded again.
Nothing in the file is executed: defaults are stored as Python literals and read with
:func:`ast.literal_eval` (an entry point whose defaults are not literals is never indexed).

The file lives in ``$PAPERPLUG_CACHE_DIR`` (default ``$XDG_CACHE_HOME/paperplug`` or
``~/.cache/paperplug``), one per interpreter and ``sys.path``; ``PAPERPLUG_CACHE_DIR=""``
turns the index off.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import sys
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from sdk.card import Card, Param

FORMAT = 1
_OWN = ("sdk.card", "sdk.constraints", "sdk.registry", "sdk.card_index")


def index_path() -> Path | None:
    """Where this interpreter's index lives; None when turned off."""
    root = os.environ.get("PAPERPLUG_CACHE_DIR")
    if root == "":
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "paperplug")
    digest = hashlib.sha256("\0".join([sys.executable, *sys.path]).encode()).hexdigest()[:16]
    return Path(root) / f"cards-{digest}.json"


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _module_file(name: str | None) -> str | None:
    module = sys.modules.get(name or "")
    return getattr(module, "__file__", None)


def source_files(module: types.ModuleType, factories: Iterable[Any]) -> set[str]:
    """Files an entry point's cards depend on: its module, the modules its namespace refers to
    and the modules of every class in each factory's MRO."""
    names = {module.__name__}
    for value in vars(module).values():
        names.add(value.__name__ if isinstance(value, types.ModuleType)
                  else getattr(value, "__module__", None))
    for factory in factories:
        for cls in inspect.getmro(factory) if inspect.isclass(factory) else (factory,):
            names.add(getattr(cls, "__module__", None))
    return {f for f in map(_module_file, names) if f is not None}


def _literal(value: Any) -> str | None:
    """``repr(value)`` when it reads back as an equal literal of the same type, else None."""
    text = repr(value)
    try:
        back = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return text if type(back) is type(value) and back == value else None


def card_to_json(card: Card) -> dict[str, Any] | None:
    """A card as JSON data; None when a default is not a literal."""
    params = []
    for p in card.params:
        item = {f.name: getattr(p, f.name) for f in attrs.fields(Param) if f.name != "default"}
        if not p.required:
            item["default"] = _literal(p.default)
            if item["default"] is None:
                return None
        params.append(item)
    data = attrs.asdict(card, recurse=False)
    data["params"] = params
    return data


def card_from_json(data: dict[str, Any]) -> Card:
    params = tuple(Param(**{**p, "default": ast.literal_eval(p["default"]) if "default" in p
                            else attrs.NOTHING}) for p in data["params"])
    return Card(**{**data, "params": params})


def _own_files() -> dict[str, list[int] | None]:
    return {f: _stat(f) for f in map(_module_file, _OWN) if f is not None}


class CardIndex:
    """The records of one index file, keyed by ``(distribution, entry point, value)``."""

    def __init__(self, path: Path | None):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.files: dict[str, list[int] | None] = {}
        self.changed = False
        self._seen: dict[str, list[int] | None] = {}
        if path is None:
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if (isinstance(data, dict) and data.get("format") == FORMAT
                and data.get("own") == _own_files()):
            self.records, self.files = data["records"], data["files"]

    @staticmethod
    def key(package: str, name: str, value: str) -> str:
        return f"{package}\0{name}\0{value}"

    def _current(self, path: str) -> list[int] | None:
        if path not in self._seen:
            self._seen[path] = _stat(path)
        return self._seen[path]

    def _valid(self, key: str, version: str | None) -> dict[str, Any] | None:
        record = self.records.get(key)
        if record is None or record["version"] != version:
            return None
        if any(self.files.get(f) != self._current(f) for f in record["files"]):
            return None
        return record

    def plugins(self, key: str, version: str | None) -> list[tuple[str, str]] | None:
        """``(kind, name)`` of what an entry point registers if its record is true, else None."""
        record = self._valid(key, version)
        return None if record is None else [tuple(p) for p in record["plugins"]]

    def cards(self, key: str, version: str | None) -> list[Card] | None:
        """The recorded cards of an entry point if its record is still true, else None."""
        record = self._valid(key, version)
        return None if record is None else [card_from_json(c) for c in json.loads(record["cards"])]

    def record(self, key: str, version: str | None, cards: list[Card], files: set[str]) -> None:
        """Remember what an entry point registered (nothing if a default is not a literal)."""
        data = [card_to_json(c) for c in cards]
        if any(d is None for d in data):
            self.records.pop(key, None)
            return
        record = {"version": version, "files": sorted(files),
                  "plugins": [[c.kind, c.name] for c in cards], "cards": json.dumps(data)}
        stats = {f: self._current(f) for f in files}
        if self.records.get(key) == record and all(self.files.get(f) == s for f, s in stats.items()):
            return
        self.files.update(stats)
        self.records[key] = record
        self.changed = True

    def save(self) -> None:
        """Write the index atomically (a temporary file, then ``os.replace``); errors are ignored:
        the index only saves time."""
        if self.path is None or not self.changed:
            return
        used = {f for r in self.records.values() for f in r["files"]}
        data = {"format": FORMAT, "own": _own_files(), "records": self.records,
                "files": {f: s for f, s in self.files.items() if f in used}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cards-", suffix=".json")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return
        self.changed = False
