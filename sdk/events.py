"""The engine's events, declared once, and the :class:`State` every listener receives.

Each :class:`Event` is the name of a method a listener defines: a :class:`sdk.interfaces.Callback`,
any component the Trainer drives (encoder, objective, teacher, sampler, reweighter, transforms,
data sampler), or a plugin module's pluggy hook ``paperplug_<event>(state)``. The Callback base
methods and the hook specifications in :mod:`sdk.hookspecs` are generated from this list.
"""

from __future__ import annotations

import difflib
import enum
from typing import Any

import attrs

PREFIXES = ("on_", "before_", "after_")
"""A method whose name starts with one of these is taken for an event listener."""


class Event(str, enum.Enum):
    """An engine event; its value is the listener method's name, ``doc`` says when it fires
    and what a listener may change."""

    doc: str

    def __new__(cls, name: str, doc: str) -> Event:
        member = str.__new__(cls, name)
        member._value_ = name
        member.doc = doc
        return member

    ON_FIT_START = ("on_fit_start",
                    "Once per `fit`, after set-up and before the first batch (and before a "
                    "checkpoint is restored). Initialise from the whole training set here "
                    "(`state.trainer.embed(state.trainer.train_loader)`); a data sampler may "
                    "size itself here.")
    ON_EPOCH_START = ("on_epoch_start",
                      "Before an epoch's first batch is drawn (not again when a resumed run "
                      "continues inside an epoch). Per-epoch refreshes (clusters, anchors, "
                      "pseudo-labels) go here.")
    AFTER_FORWARD = ("after_forward",
                     "The model ran on one micro-batch: `state.x`, `state.batch` and "
                     "`state.views` (with the teacher's memory merged in) are set. Replacing "
                     "`state.batch` or `state.views` changes what the objective receives.")
    AFTER_LOSS = ("after_loss",
                  "The objective (and reweighter) ran: `state.loss` is set. Replacing "
                  "`state.loss` changes what is back-propagated (e.g. add a term).")
    BEFORE_BACKWARD = ("before_backward",
                       "The loss of the micro-batch is about to be back-propagated; "
                       "`state.loss` is final.")
    BEFORE_OPTIMIZER_STEP = ("before_optimizer_step",
                             "Gradients of the whole step are ready (averaged over ranks, "
                             "unscaled), before clipping and the optimizer step: listeners may "
                             "transform the gradients of `state.model`'s parameters (or any "
                             "parameter in `state.optimizer`).")
    AFTER_OPTIMIZER_STEP = ("after_optimizer_step",
                            "The optimizer and the LR scheduler stepped (`state.step` counts "
                            "it), before the teacher's update: listeners may write parameters "
                            "or set `state.trainer.should_stop`.")
    ON_EPOCH_END = ("on_epoch_end",
                    "An epoch's batches are done, before validation and the epoch's "
                    "checkpoint (does not fire when a run stops inside an epoch). "
                    "Whole-dataset refreshes go here.")
    ON_VALIDATION_END = ("on_validation_end",
                         "Validation ran at an epoch end or a stop: "
                         "`state.trainer.val_metrics` holds its metrics.")
    ON_LOG = ("on_log",
              "A record was logged: `state.record` holds it (a `train` record every "
              "`log_every` steps, an `epoch` record at each epoch end or stop; the dict that "
              "metrics.jsonl receives, on every rank). Experiment trackers forward it; "
              "listeners must not change it.")
    ON_FIT_END = ("on_fit_end",
                  "Once per `fit`, after the last step, the summary and the plots are "
                  "written. Post-training fits (centroids, calibrators) go here.")


EVENTS: tuple[str, ...] = tuple(event.value for event in Event)
"""The events' method names, in the order a run fires them."""


@attrs.define(kw_only=True, eq=False)
class State:
    """What an event's listener sees: the loop's position and the records of the current
    micro-batch. One object for the whole run, updated in place by the engine (its fields are
    not validated on every step); ``batch``, ``views`` and ``loss`` may be replaced (see
    :class:`Event`). ``trainer`` gives ``embed()``, ``train_loader``, ``val_metrics``,
    ``should_stop``, ``teacher`` and the rest of the loop."""

    trainer: Any = None
    model: Any = None
    optimizer: Any = None
    step: int = 0
    epoch: int = 0
    x: Any = None
    batch: Any = None
    views: Any = None
    loss: Any = None
    record: Any = None


def is_listener_name(name: str) -> bool:
    """Whether ``name`` looks like an event listener's method (``on_*``, ``before_*``, ``after_*``)."""
    return name.startswith(PREFIXES) and not name.startswith("__")


_SYNONYMS = {"begin": "start", "finish": "end", "stop": "end", "pre": "before", "post": "after",
             "train": "fit", "val": "validation"}


def closest(name: str) -> str | None:
    """The event whose name is closest to ``name`` (``None`` when none is close); words with a
    synonym in the events' vocabulary (``begin`` for ``start``, ...) are read as that word."""
    words = "_".join(_SYNONYMS.get(word, word) for word in name.split("_"))
    found = difflib.get_close_matches(words, EVENTS, n=1, cutoff=0.5)
    return found[0] if found else None


def table() -> str:
    """The events as a Markdown table (event, when it fires and what a listener may change),
    as rendered in the concepts page."""
    rows = ["| event | when it fires, what a listener may change |", "| --- | --- |"]
    rows += [f"| `{event.value}` | {event.doc} |" for event in Event]
    return "\n".join(rows)
