"""paperplug core: typed interfaces, plugin registry, composition and the training engine.

``import sdk`` is cheap: it imports neither torch nor any plugin. Public names are
resolved on first access (PEP 562), plugins on first lookup.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdk.errors import (
    ConfigError,
    NonFiniteError,
    NotFittedError,
    PluginConflictError,
    PluginError,
    PluginFailure,
    PluginNotFoundError,
    RequirementError,
    ShapeError,
)

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "Views": "sdk.types",
    "Batch": "sdk.types",
    "Loss": "sdk.types",
    "Pairs": "sdk.types",
    "Logits": "sdk.types",
    "Probabilities": "sdk.types",
    "Card": "sdk.card",
    "Param": "sdk.card",
    "FromData": "sdk.context",
    "hookimpl": "sdk.hookspecs",
    "Registry": "sdk.registry",
    "get_registry": "sdk.registry",
    "create": "sdk.registry",
    "plugins": "sdk.registry",
    "broken_plugins": "sdk.registry",
    "WeightedSum": "sdk.compose",
    "Trainer": "sdk.engine",
    "encoder": "sdk.backbone",
    "load_run": "sdk.runs",
}
_SUBMODULES = {
    "interfaces", "types", "card", "hookspecs", "registry", "compose", "config", "contrastive",
    "distributed", "testing", "engine", "metrics", "data", "checkpoint", "plots", "cli", "cluster",
    "state", "context", "constraints", "events", "keys", "faults", "backbone",
    "runs",
}

__all__ = [
    "ConfigError", "NonFiniteError", "NotFittedError", "PluginConflictError", "PluginError", "PluginFailure",
    "PluginNotFoundError", "RequirementError", "ShapeError", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"sdk.{name}")
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from sdk.backbone import encoder
    from sdk.card import Card, Param
    from sdk.compose import WeightedSum
    from sdk.context import FromData
    from sdk.engine import Trainer
    from sdk.hookspecs import hookimpl
    from sdk.registry import Registry, broken_plugins, create, get_registry, plugins
    from sdk.runs import load_run
    from sdk.types import Batch, Logits, Loss, Pairs, Probabilities, Views
