"""pluggy hook specifications: the plugin contract.

A plugin module implements ``paperplug_register(registry)`` with the ``@sdk.hookimpl``
marker and is listed under the ``paperplug`` entry-point group of its package. Engine event
hooks (``paperplug_on_epoch_end(trainer)`` ...) let a plugin module act on every run.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "paperplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def paperplug_register(registry: Any) -> None:
    """Add this module's plugins: ``registry.add(factory, card=Card(...))``."""


@hookspec
def paperplug_on_fit_start(trainer: Any) -> None:
    """Training is about to start."""


@hookspec
def paperplug_on_epoch_start(trainer: Any) -> None:
    """An epoch is about to start."""


@hookspec
def paperplug_on_epoch_end(trainer: Any) -> None:
    """An epoch ended (whole-dataset refreshes go here, through ``trainer.embed``)."""


@hookspec
def paperplug_after_forward(trainer: Any) -> None:
    """The model ran on a batch (``trainer.views``, ``trainer.batch``)."""


@hookspec
def paperplug_after_loss(trainer: Any) -> None:
    """The objective ran (``trainer.loss``; replacing it changes what is minimised)."""


@hookspec
def paperplug_before_backward(trainer: Any) -> None:
    """The loss is about to be back-propagated."""


@hookspec
def paperplug_before_optimizer_step(trainer: Any) -> None:
    """Gradients are ready; the optimizer has not stepped yet."""


@hookspec
def paperplug_after_optimizer_step(trainer: Any) -> None:
    """The optimizer stepped."""


@hookspec
def paperplug_on_validation_end(trainer: Any) -> None:
    """Validation ran at an epoch end (``trainer.val_metrics``)."""


@hookspec
def paperplug_on_fit_end(trainer: Any) -> None:
    """Training ended."""
