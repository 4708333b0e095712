"""Experiment trackers as callbacks: what every tracker sends, decided once.

A :class:`Tracker` forwards a run to an experiment tracker (TensorBoard, MLflow, W&B: the
``tensorboard``, ``mlflow`` and ``wandb`` callback plugins) on the main process only:

- at ``on_fit_start``, the hyperparameters: the run's recipe (``run_dir/config.toml``, as dotted
  keys ``optimizer.lr``) when the run has one, else the Trainer's settings;
- at every ``on_log``, the scalars of the record that metrics.jsonl receives, as
  ``train/<key>`` (every ``log_every`` steps) or ``epoch/<key>`` (each epoch end) at the
  record's step;
- at the end, the summary (``summary/<key>``) and the run's plots (``*.png`` in ``run_dir``) as
  artifacts. A :class:`~sdk.Trainer` used as a library ends the tracker at ``on_fit_end`` with
  ``trainer.summary``; ``paperplug run`` ends it after evaluation and calibration, with the
  run's whole summary and its reliability diagram.

A subclass implements :meth:`start`, :meth:`log_scalars`, :meth:`log_summary`,
:meth:`log_artifact` and :meth:`close` against its library, imported when the run starts.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdk.interfaces import Callback

#: Trainer settings logged as hyperparameters when a run has no recipe
TRAINER_SETTINGS = ("max_epochs", "max_steps", "precision", "accumulate", "clip_grad_norm",
                    "log_every", "seed")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists of tables are numbered
    (``objectives.0.name``); other lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


def scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a record (booleans and the position keys left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step", "epoch", "partial") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(Callback, abc.ABC):
    """Base of the tracker callbacks (see the module). ``finish_at_fit_end`` is cleared by
    ``paperplug run``, which calls :meth:`finish` itself once the run's summary is complete."""

    finish_at_fit_end: bool = True

    def __init__(self) -> None:
        self.active = False
        self.run_dir: Path | None = None

    # what a tracker implements ----------------------------------------------------------
    @abc.abstractmethod
    def start(self, run_dir: Path | None, params: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def log_summary(self, values: dict[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def log_artifact(self, path: Path) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    # events ---------------------------------------------------------------------------
    def on_fit_start(self, state: Any) -> None:
        trainer = state.trainer
        if not trainer.is_main or self.active:
            return
        self.run_dir = None if trainer.run_dir is None else Path(trainer.run_dir)
        self.step = state.step
        self.start(self.run_dir, self.hyperparameters(trainer))
        self.active = True

    def on_log(self, state: Any) -> None:
        if self.active:
            record = state.record
            kind = "train" if record.get("kind") == "train" else "epoch"
            values = scalars(record, kind)
            self.step = int(record.get("step", state.step))
            if values:
                self.log_scalars(values, self.step)

    def on_fit_end(self, state: Any) -> None:
        if self.active and self.finish_at_fit_end:
            self.finish(getattr(state.trainer, "summary", {}) or {})

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Log the summary and the run's plots, then close (once)."""
        if not self.active:
            return
        self.active = False
        try:
            values = scalars(summary, "summary")
            if values:
                self.log_summary(values, self.step)
            if self.run_dir is not None:
                for png in sorted(self.run_dir.glob("*.png")):
                    self.log_artifact(png)
        finally:
            self.close()

    def hyperparameters(self, trainer: Any) -> dict[str, Any]:
        """The run's recipe as dotted keys, else the Trainer's settings."""
        recipe = None if trainer.run_dir is None else Path(trainer.run_dir) / "config.toml"
        if recipe is not None and recipe.exists():
            from sdk.config import tomllib

            return flatten(tomllib.loads(recipe.read_text()))
        return {k: getattr(trainer, k) for k in TRAINER_SETTINGS
                if getattr(trainer, k, None) is not None}
