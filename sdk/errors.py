"""Exceptions raised by paperplug. Every message names the field, plugin or shape at fault."""

from __future__ import annotations


class PluginError(Exception):
    """Base class of plugin lookup and registration errors."""


class PluginNotFoundError(PluginError, LookupError):
    """No plugin of that kind and name is registered."""


class PluginConflictError(PluginError):
    """Two packages registered a plugin under the same kind and name."""


class ConfigError(ValueError):
    """A parameter or recipe entry is unknown or has the wrong type.

    ``path`` names the offending key (``"objectives[1].lambd"``), ``param`` the parameter.
    """

    def __init__(self, message: str, *, param: str | None = None, path: str | None = None):
        super().__init__(message)
        self.param = param
        self.path = path


class ShapeError(ValueError):
    """A tensor has the wrong shape, dtype or batch size for the record or plugin using it."""


class RequirementError(ValueError):
    """An objective received fewer views, or no targets/logits/index, than it declares it requires."""


class NotFittedError(RuntimeError):
    """A plugin that learns from data (a detector's statistics) was used before it was fitted."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read, verified or restored; the message names the file
    and the reason (truncated, checksum mismatch, unsafe content, keys that do not match)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on resume (the message names the file and why)."""


class PluginFailure(RuntimeError):
    """A plugin raised during ``Trainer.fit``: ``plugin`` (its registry name, else its class
    name), ``kind`` (``objective``, ``sampler``, ``teacher``, ``transform``, ``callback``,
    ``hook`` for a plugin module's pluggy hook, ...) and ``where`` (the event, e.g.
    ``"on_epoch_end"``, or the call, e.g. ``"pairs"``, ``"update"``) it failed in. The original
    exception is chained as ``__cause__``; the run's checkpoints are those written before it."""

    def __init__(self, message: str, *, plugin: str, kind: str, where: str):
        super().__init__(message)
        self.plugin, self.kind, self.where = plugin, kind, where


class NonFiniteError(FloatingPointError):
    """The training loss went NaN or infinite (``on_nonfinite="raise"``): ``step`` is the first
    optimizer step whose loss was not finite (counted from 1, as the logs count steps),
    ``terms`` the objective's per-term logs at that step (name -> value) and ``checkpoint`` the
    newest checkpoint written before it (``None`` when there is none)."""

    def __init__(self, message: str, *, step: int, terms: dict[str, float],
                 checkpoint: str | None):
        super().__init__(message)
        self.step, self.terms, self.checkpoint = step, terms, checkpoint
