"""pluggy hook specifications: the plugin contract.

A plugin module implements ``paperplug_register(registry)`` with the ``@sdk.hookimpl``
marker and is listed under the ``paperplug`` entry-point group of its package. Engine event
hooks ``paperplug_<event>(state)`` (``paperplug_on_epoch_end(state)`` ...) let a plugin module
act on every run; they are generated from :class:`sdk.events.Event` and receive the run's
:class:`sdk.events.State`.
"""

from __future__ import annotations

import functools
from typing import Any

import pluggy

from sdk.events import Event

PROJECT = "paperplug"
PREFIX = f"{PROJECT}_"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def paperplug_register(registry: Any) -> None:
    """Add this module's plugins: ``registry.add(factory, card=Card(...))``."""


@functools.cache  # every fit looks up each event's hook
def hook_name(event: Event | str) -> str:
    """The pluggy hook of an event: ``paperplug_<event>``."""
    return PREFIX + Event(event).value


def _event_spec(event: Event) -> Any:
    def spec(state: Any) -> None:
        pass

    spec.__name__ = spec.__qualname__ = hook_name(event)
    spec.__doc__ = event.doc
    return hookspec(spec)


for _event in Event:  # one hook per event, derived from the one list of events
    globals()[hook_name(_event)] = _event_spec(_event)
del _event
