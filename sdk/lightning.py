"""Train an :class:`sdk.Trainer`'s components with PyTorch Lightning.

:class:`PaperplugModule` wraps a configured (not yet fitted) ``sdk.Trainer`` as a
``lightning.LightningModule``: Lightning runs the loop (devices, strategies, loggers,
checkpoints), the wrapped Trainer computes each step exactly as its own ``fit`` would — the
view transforms, the encoder, the teacher's outputs and memory, the pair sampler inside the
objective, the reweighter — and the events fire at the matching Lightning hooks::

    sdk event               Lightning hook
    on_fit_start            on_fit_start (after the global RNGs are seeded with ``seed``)
    on_epoch_start          on_train_epoch_start
    after_forward, after_loss   inside training_step
    before_backward         on_before_backward
    (teacher.observe)       on_after_backward
    before_optimizer_step   on_before_optimizer_step
    after_optimizer_step    on_train_batch_end, then teacher.update
    on_epoch_end            on_train_epoch_end
    on_fit_end              on_fit_end

With the same seed, data order and initial weights the losses equal ``sdk.Trainer.fit``'s
step for step (give the DataLoader a seeded ``generator``, as ``sdk.Trainer`` does, so that
each epoch's iterator does not draw from the global RNG that random transforms use).
Lightning's own settings replace the sdk Trainer's loop settings (its
``max_steps``/``max_epochs``, precision, gradient clipping, checkpointing, logging: the
module logs ``loss`` and the objective's term logs through ``self.log``); the optimizer and
scheduler are built from the sdk Trainer's ``optimizer`` and ``scheduler`` (stepped every
optimizer step). Not supported here, each a clear error at ``fit``: gradient accumulation
(``accumulate_grad_batches > 1``), an objective that learns from an unlabelled loader, and
``on_validation_end`` / ``on_log`` listeners (Lightning's validation loop and loggers take
their place). Calibrators and
detectors are fitted after training on the module's outputs, as with ``sdk.Trainer``.

Needs the ``lightning`` package (``pip install paperplug[lightning]``).
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sdk.lightning needs the 'lightning' package: "
                      "pip install 'paperplug[lightning]'") from exc
import torch
from torch import Tensor, nn

from sdk import checkpoint as ckpt
from sdk.engine import Trainer
from sdk.errors import ConfigError
from sdk.events import Event

__all__ = ["PaperplugModule"]

_UNSUPPORTED = (Event.ON_VALIDATION_END, Event.ON_LOG)


class PaperplugModule(L.LightningModule):
    """A LightningModule that trains ``trainer``'s encoder with its objective, teacher,
    transforms, sampler and reweighter (see the module docstring for the event mapping).

    ``trainer.encoder`` is the trained model (``module.encoder``); use ``trainer.embed`` or the
    encoder itself for inference after ``lightning.Trainer.fit``."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        if not isinstance(trainer, Trainer):
            raise ConfigError(f"PaperplugModule wraps an sdk.Trainer, got {type(trainer).__name__}",
                              param="trainer")
        if trainer._setup_done:
            raise ConfigError("PaperplugModule needs an sdk.Trainer that has not run fit",
                              param="trainer")
        self.engine = trainer
        self.encoder = trainer.encoder
        # the other modules, so that Lightning moves them and counts their parameters
        self.parts = nn.ModuleList(c for c in trainer.components
                                   if isinstance(c, nn.Module) and c is not trainer.encoder)

    # set-up ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        engine = self.engine
        engine.params = engine.trainable_parameters()
        if not engine.params:
            raise ConfigError("nothing to train: no parameter requires grad", param="encoder")
        engine.optimizer = engine._build_optimizer(engine.params)
        engine.state.optimizer = engine.optimizer
        engine.scheduler = engine._build_scheduler()
        if engine.scheduler is None:
            return engine.optimizer
        return {"optimizer": engine.optimizer,
                "lr_scheduler": {"scheduler": engine.scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        engine, loop = self.engine, self.trainer
        if loop.accumulate_grad_batches != 1:
            raise ConfigError("PaperplugModule: accumulate_grad_batches must be 1 (an sdk event "
                              "step is one optimizer step)", param="accumulate_grad_batches")
        if engine.objective.requires.get("unlabeled"):
            raise ConfigError(f"PaperplugModule: objective {engine.objective.name!r} learns from "
                              "an unlabelled loader, which only sdk.Trainer.fit(unlabeled=...) "
                              "draws", param="objective")
        engine.device = self.device
        engine._on_cpu = self.device.type == "cpu"
        engine.rank, engine.world = loop.global_rank, loop.world_size
        engine.is_main = loop.is_global_zero
        ckpt.seed_everything(engine.seed + engine.rank)
        engine._plan()
        compiled = engine.compile
        engine._encode = torch.compile(engine._encode_impl) if compiled else engine._encode_impl
        engine._encode_z = torch.compile(engine.encoder) if compiled else engine.encoder
        engine._autocast = contextlib.nullcontext  # Lightning's precision plugin autocasts
        engine._collect_listeners()
        for event in _UNSUPPORTED:
            if engine._listeners[event]:
                raise ConfigError(f"PaperplugModule: {event.value!r} listeners do not run under "
                                  f"Lightning (use its validation loop and loggers)",
                                  param=event.value)
        engine._checked = False
        steps = loop.estimated_stepping_batches
        engine.total_steps = int(steps) if steps != float("inf") else None
        engine._setup_done = True
        engine.emit(Event.ON_FIT_START)

    # the step ----------------------------------------------------------------------------
    def training_step(self, item: Any, batch_idx: int) -> Tensor:
        engine = self.engine
        state = engine.state
        state.step, state.epoch = self.global_step, self.current_epoch
        state.views = state.loss = None
        x, batch = engine._to_device(item, check=not engine._checked)
        if engine._tells_progress:
            engine.objective.set_progress(state.step, engine.total_steps)
        value = engine._compute(x, batch)
        engine._checked = True
        self.log("loss", value.detach(), prog_bar=True, batch_size=x.shape[0])
        for key, term in state.loss.logs.items():
            self.log(key, term, batch_size=x.shape[0])
        return value

    def on_before_backward(self, loss: Tensor) -> None:
        self.engine.emit(Event.BEFORE_BACKWARD)

    def on_after_backward(self) -> None:
        engine = self.engine
        if engine._teacher_observes:
            state = engine.state
            engine.teacher.observe(views=state.views, batch=state.batch, step=state.step,
                                   max_steps=engine.total_steps)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.emit(Event.BEFORE_OPTIMIZER_STEP)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        engine = self.engine
        state = engine.state
        taken = state.step
        state.step = taken + 1
        engine.emit(Event.AFTER_OPTIMIZER_STEP)
        if engine.teacher is not None:
            observed = engine._teacher_observes
            engine.teacher.update(student=engine.encoder,
                                  views=None if observed else state.views,
                                  batch=None if observed else state.batch, step=taken,
                                  max_steps=engine.total_steps)
        if engine.should_stop:
            self.trainer.should_stop = True

    # epochs ------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.engine.state.epoch = self.current_epoch
        self.engine.emit(Event.ON_EPOCH_START)

    def on_train_epoch_end(self) -> None:
        self.engine.emit(Event.ON_EPOCH_END)

    def on_fit_end(self) -> None:
        self.engine.emit(Event.ON_FIT_END)

    def validation_step(self, item: Any, batch_idx: int) -> Tensor:
        """The objective's loss on a validation batch, as ``sdk.Trainer.evaluate`` computes it
        (no events; logged as ``val_loss``)."""
        x, batch = self.engine._to_device(item)
        value = self.engine._compute(x, batch, events=False)
        self.log("val_loss", value, batch_size=x.shape[0])
        return value

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)
