"""Naming the plugin at fault: an exception raised inside a plugin during ``Trainer.fit``
becomes a :class:`~sdk.errors.PluginFailure` naming the plugin, its kind and the event or call
it failed in, with the original exception chained.

Nothing is wrapped per call (the loop runs at full speed): when ``fit`` fails, :func:`blame`
reads the exception's traceback and names the innermost plugin on it, so a pair sampler called
by an objective term of ``0.5 * a + b`` is named rather than the sum. What is not wrapped:

* errors raised outside any plugin (the engine, the user's own encoder, the data loader);
* paperplug's input-validation errors (:class:`~sdk.errors.ConfigError`,
  :class:`~sdk.errors.ShapeError`, :class:`~sdk.errors.RequirementError`,
  :class:`~sdk.errors.CheckpointError`, :class:`~sdk.errors.PluginError`): they keep their
  type, and their messages already name the plugin and the value at fault;
* a :class:`~sdk.errors.PluginFailure` (never wrapped twice);
* an error raised inside ``torch.distributed`` (a collective whose peer died or timed out):
  the plugin that called the collective is not at fault.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from types import CodeType
from typing import Any

import torch

from sdk.errors import (
    CheckpointError,
    ConfigError,
    PluginError,
    PluginFailure,
    RequirementError,
    ShapeError,
)
from sdk.events import EVENTS
from sdk.hookspecs import hook_name
from sdk.interfaces import (
    Callback,
    DataSampler,
    Encoder,
    Objective,
    Reweighter,
    Sampler,
    Schedule,
    Teacher,
    Transform,
)

PASSED_THROUGH = (PluginFailure, ConfigError, ShapeError, RequirementError, CheckpointError,
                  PluginError)
"""Exceptions :func:`blame` leaves as they are."""

_KINDS = ((Objective, "objective"), (Sampler, "sampler"), (Teacher, "teacher"),
          (Transform, "transform"), (Reweighter, "reweighter"), (DataSampler, "sampler"),
          (Callback, "callback"), (Schedule, "schedule"), (Encoder, "encoder"))
_TORCH = os.path.dirname(torch.__file__) + os.sep
_DISTRIBUTED = os.path.join(_TORCH, "distributed") + os.sep


def kind_of(plugin: Any) -> str:
    """The plugin kind of ``plugin``'s interface (``"plugin"`` for an object of none)."""
    return next((kind for base, kind in _KINDS if isinstance(plugin, base)), "plugin")


def name_of(plugin: Any) -> str:
    """The name ``sdk.create`` built ``plugin`` under, else its class name."""
    name = plugin.name if isinstance(plugin, Objective) else getattr(plugin, "_plugin_name", None)
    return name or type(plugin).__name__


def plugin_objects(listening: Iterable[Any], encoder: Any) -> list[Any]:
    """The objects whose methods count as a plugin's: the trainer's listening components but a
    user's own ``encoder`` (one not built by ``sdk.create``), and the objectives, samplers,
    teachers, transforms and reweighters inside them."""
    parts = [c for c in listening if c is not encoder or getattr(c, "_plugin_name", None)]
    inner = [m for c in parts if isinstance(c, torch.nn.Module) for m in c.modules()
             if isinstance(m, (Objective, Sampler, Teacher, Transform, Reweighter))]
    return list({id(p): p for p in [*parts, *inner]}.values())


def hook_code(plugin_manager: Any) -> dict[CodeType, tuple[str, str]]:
    """The code of every plugin module's event hook -> (its plugin's name, the event)."""
    hooks = vars(plugin_manager.hook)
    return {impl.function.__code__: (impl.plugin_name, event)
            for event in EVENTS if (hook := hooks.get(hook_name(event))) is not None
            for impl in hook.get_hookimpls() if hasattr(impl.function, "__code__")}


def listener_code(listeners: Mapping[str, Iterable[Callable[..., Any]]]
                  ) -> dict[tuple[int, CodeType], str]:
    """``(id(component), code)`` of every bound listener method -> its event."""
    return {(id(method.__self__), method.__func__.__code__): event
            for event, found in listeners.items() for method in found
            if hasattr(method, "__func__") and hasattr(method.__func__, "__code__")}


def blame(exc: BaseException, plugins: Iterable[Any],
          hooks: Mapping[CodeType, tuple[str, str]] = {},
          listeners: Mapping[tuple[int, CodeType], str] = {}) -> PluginFailure | None:
    """The :class:`PluginFailure` for ``exc``: the innermost of ``plugins`` (objects whose
    methods ran) or of ``hooks`` (a pluggy hook implementation's code -> its plugin's name and
    event) on ``exc``'s traceback, and how the run entered it: the event when the entry is one
    of ``listeners`` (``(id(plugin), code)`` -> event), else the method's name. ``None`` when no
    plugin is on the traceback or ``exc`` is one of :data:`PASSED_THROUGH`."""
    if isinstance(exc, PASSED_THROUGH) or not isinstance(exc, Exception):
        return None
    known = {id(p): p for p in plugins}
    culprit: Any = None  # the innermost plugin so far: an object, or (name, event) of a hook
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        frame, tb = tb.tb_frame, tb.tb_next
        code = frame.f_code
        if tb is None and code.co_filename.startswith(_DISTRIBUTED):
            return None  # a collective failed: a peer, not this plugin
        if code in hooks:
            culprit = hooks[code]
            where = culprit[1]
            continue
        if code.co_filename.startswith(_TORCH):  # nn.Module's call machinery
            continue
        owner = frame.f_locals.get("self")
        if owner is None or id(owner) not in known:
            continue
        if owner is not culprit:  # entered a plugin: the first public method is how
            culprit, where = owner, listeners.get((id(owner), code), code.co_name)
        elif where.startswith("_") and not code.co_name.startswith("_"):
            where = code.co_name
    if culprit is None:
        return None
    if isinstance(culprit, tuple):
        name, kind = culprit[0], "hook"
    else:
        name, kind = name_of(culprit), kind_of(culprit)
    place = f"event {where!r}" if where in EVENTS else f"{where}()"
    return PluginFailure(f"{kind} {name!r} failed in {place}: {type(exc).__name__}: {exc}",
                         plugin=name, kind=kind, where=where)
