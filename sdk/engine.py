"""The execution loop: :class:`Trainer` turns a composition of plugins into a trained model.

One optimisation step (``accumulate`` micro-batches)::

    objective.set_progress(step, max_steps)
    x, batch    <- loader item (x, targets, index, ...) moved to the device
    x_v, batch  <- transforms[v](x, batch)                      one per view (threads batch)
    z_v         <- encoder(x_v)  (+ features, teacher outputs, teacher.memory())  -> Views
    [fit(unlabeled=...)] u <- next unlabelled batch; encoder(unlabeled_transforms[k](u))
                -> Views.extras[keys.UNLABELED] (one [mu B, D] per view), [keys.UNLABELED_INDEX]
    after_forward          (may replace state.batch / state.views)
    loss        <- objective(views, batch) (-> reweighter.reduce(loss, batch))
    after_loss             (may replace state.loss), before_backward,
    backward (scaled by 1 / accumulate)
    teacher.observe(views, batch)           every micro-batch (teachers that observe)
    before_optimizer_step  (gradients ready and unscaled), clip, optimizer step,
    scheduler step, after_optimizer_step, teacher.update(...), zero_grad

Events (:class:`sdk.events.Event`) go to the callbacks, to every component (encoder,
objective and its terms and samplers, teacher, sampler, reweighter, transforms, data sampler)
that defines a method of the event's name, and to the pluggy hooks ``paperplug_<event>(state)``
of every plugin module; each receives the run's :class:`sdk.events.State`. A method named like
an event (``on_*``, ``before_*``, ``after_*``) that is none raises :class:`ConfigError` when
``fit`` starts.

How a model provides what objectives need (see :mod:`sdk.keys` for the extras):

* **embeddings**: ``Views.embeddings[v] = encoder(transforms[v](x))``.
* **features**: when the encoder is an sdk Encoder with a ``head`` (as ``projection_head``,
  ``encoder(x) = head(features(x))``), the backbone runs once per view and
  ``Views.extras[keys.FEATURES]`` holds ``features(x_v)``; an Encoder without a ``head`` gets the
  extra only when the objective requires ``extras=(keys.FEATURES,)``.
* **logits**: when the objective requires logits, the encoder's output on the first view *is*
  the logits (a supervised model's ``out_dim`` is the number of classes). A sequence model's
  output ``[B, T, V]`` (next-token scores, :mod:`sdk.sequence`) is the logits only: it is no
  ``[B, D]`` embedding, so ``Views.embeddings`` is then empty.
* **teacher**: ``Teacher.attach(encoder)`` when the first fit starts; a teacher that
  ``encodes_views`` gives ``Views.extras[keys.TEACHER] = teacher(x_v)`` per view; its
  ``memory()`` (queues, memory banks) is merged into ``Views.extras``. Validation
  (:meth:`Trainer.evaluate`) builds the objective's inputs the same way, without events.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import operator
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from sdk import checkpoint as ckpt
from sdk import distributed, faults, keys
from sdk.compose import check_composition, check_parts
from sdk.config import trainer_config, with_trainer_settings
from sdk.errors import CheckpointError, ConfigError, NonFiniteError, RequirementError
from sdk.events import EVENTS, Event, State, closest, is_listener_name
from sdk.hookspecs import PREFIX, hook_name
from sdk.interfaces import (
    Callback,
    DataSampler,
    Encoder,
    Objective,
    Schedule,
    Teacher,
    Transform,
)
from sdk.interfaces import Sampler as PairSampler
from sdk.types import Batch, Loss, Views, unchecked_builder

_NULL = contextlib.nullcontext()
_unchecked_batch = unchecked_builder(Batch)
_unchecked_views = unchecked_builder(Views)
_plain_views = unchecked_builder(Views, convert=False)  # the plain loop's: a tuple, no extras
_LOSS, _SAMPLES = operator.itemgetter(0), operator.itemgetter(3)  # of a log window's entry
_ITEM_FIELDS = ("targets", "index", "domain")
# torch's process-wide module hooks: nn.Module._call_impl calls forward directly, with none of
# its hook handling, when neither these nor the module's own hooks are set (and it is neither
# compiled nor traced); the plain loop makes that test itself and, when it holds, calls the
# objective's forward (the Python of two calls less per step). A torch without these names
# (None) has every call go through nn.Module.__call__.
_GLOBAL_MODULE_HOOKS = tuple(vars(_torch_module).get(name) for name in (
    "_global_backward_pre_hooks", "_global_backward_hooks", "_global_forward_hooks",
    "_global_forward_pre_hooks"))
if any(hooks is None for hooks in _GLOBAL_MODULE_HOOKS):
    _GLOBAL_MODULE_HOOKS = None
_OWN_MODULE_HOOKS = ("_backward_hooks", "_backward_pre_hooks", "_forward_hooks",
                     "_forward_pre_hooks")
_STATEFUL = (nn.Module, Callback, DataSampler, Schedule)  # the kinds that declare state_dict
_BATCH_FIELDS = ("targets", "index", "domain", "weight")
UNLABELED_SEED = 104_729
"""The unlabelled loader's shuffling is seeded with ``seed + UNLABELED_SEED`` (its own order,
even when it holds as many samples as the labelled one)."""


class ResumableSampler(DataSampler):
    """Seeded per-epoch order of ``n`` indices, sharded over ranks, able to skip a prefix.

    Epoch ``e`` uses ``randperm(n)`` from a generator seeded with ``seed + e`` (or ``0..n-1``
    without shuffling), padded by wrapping around to a multiple of ``world`` and split
    ``order[rank::world]`` as ``DistributedSampler`` does. ``skip(k)`` drops the first ``k``
    indices of the next iteration only (mid-epoch resume).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        self._skip = count

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = len(self) * self.world
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        if self.world > 1:
            order = order[self.rank::self.world]
        if self._skip:
            order, self._skip = order[self._skip:], 0
        return iter(order.tolist())


class RankShard(DataSampler):
    """This rank's share of a data sampler's order: the order of each epoch, padded by wrapping
    around to a multiple of ``world``, split ``order[rank::world]`` (as ``DistributedSampler``
    does). The wrapped sampler must give every rank the same order."""

    def __init__(self, sampler: Any, *, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def set_epoch(self, epoch: int) -> None:
        set_epoch(self.sampler, epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.world)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        total = math.ceil(len(order) / self.world) * self.world
        order += order[: total - len(order)]
        return iter(order[self.rank::self.world])


class UnlabeledStream:
    """The unlabelled loader of a semi-supervised fit, one batch per labelled micro-batch:
    drawn epoch after epoch independently of the labelled loader (FixMatch restarts its
    unlabelled iterator when it runs out). ``position`` is ``(epoch, batch)``: the epoch being
    drawn and the batches already drawn from it, which a checkpoint records. With a
    :class:`ResumableSampler` (a map-style loader that the Trainer rebuilt) epoch ``e`` is the
    sampler's epoch ``e`` and a resume skips the drawn prefix of its order; any other loader is
    fast-forwarded batch by batch."""

    def __init__(self, loader: Any, sampler: ResumableSampler | None, *, seed: int,
                 position: tuple[int, int] = (0, 0)):
        self.loader, self.sampler, self.seed = loader, sampler, seed
        self.epoch, self.batch = position
        self._it: Iterator[Any] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.batch

    def seek(self, epoch: int, batch: int) -> None:
        """Continue at ``batch`` of ``epoch`` (the next draw starts the iterator there)."""
        self.epoch, self.batch, self._it = epoch, batch, None

    def _start(self) -> Iterator[Any]:
        loader = self.loader
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip(self.batch * loader.batch_size)
            loader.generator.manual_seed(self.seed + self.epoch)  # seeds the workers
        elif isinstance(loader, DataLoader):
            set_epoch(loader.sampler, self.epoch)
        it = iter(loader)
        if self.sampler is None:
            for _ in range(self.batch):
                next(it)
        return it

    def next(self) -> Any:
        if self._it is None:
            self._it = self._start()
        item = next(self._it, None)
        if item is None:  # the epoch is over: the next one, reshuffled
            if self.batch == 0:
                raise ConfigError("the unlabeled loader yields no batch (fewer samples than its "
                                  "batch_size with drop_last?)", param="unlabeled")
            self.seek(self.epoch + 1, 0)
            return self.next()
        self.batch += 1
        return item


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this rank's CUDA device when CUDA is available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    return torch.device(device)


def set_epoch(sampler: Any, epoch: int) -> None:
    """Tell a data sampler the epoch about to start (an sdk DataSampler or torch's
    ``DistributedSampler``; other samplers have no epochs)."""
    if isinstance(sampler, (DataSampler, DistributedSampler)):
        sampler.set_epoch(epoch)


_BINDABLE = (staticmethod, classmethod, functools.partialmethod, type(set_epoch))


def listener_methods(component: Any) -> dict[str, Callable[[State], Any]]:
    """The event listeners ``component`` defines (its class's methods named like an event,
    bound to it; the no-op defaults of :class:`Callback` excluded). A method named like an event
    (``on_*``, ``before_*``, ``after_*``) that is not one raises :class:`ConfigError` naming the
    component, the method and the closest event."""
    klass = type(component)
    out: dict[str, Callable[[State], Any]] = {}
    for name in _listener_names(klass):
        # the value is read on every call: a listener replaced on the class is the one used
        value = next(vars(base)[name] for base in klass.__mro__
                     if base is not Callback and base is not object and name in vars(base))
        if value is not None:
            out[name] = value.__get__(component, klass) if isinstance(value, _BINDABLE) else value
    return out


_LISTENERS: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _listener_names(klass: type) -> tuple[str, ...]:
    """The names of ``klass``'s attributes (through its MRO, :class:`Callback`'s no-op defaults
    excluded) named like an event, checked and cached per class (walking ``nn.Module``'s
    attributes on every ``fit`` costs more than a small step)."""
    cached = _LISTENERS.get(klass)
    if cached is not None:
        return cached
    names = [name for base in reversed(klass.__mro__) if base is not Callback and base is not object
             for name in vars(base) if is_listener_name(name)]
    names = tuple(dict.fromkeys(names))
    for name in names:
        if name not in EVENTS:
            near = closest(name)
            hint = f" (closest event: {near!r})" if near else ""
            raise ConfigError(f"{klass.__name__}.{name} is named like an engine event but "
                              f"is none{hint}; events: {', '.join(EVENTS)}", param=name)
    _LISTENERS[klass] = names
    return names


def _modules_of(obj: Any) -> list[nn.Module]:
    return [obj] if isinstance(obj, nn.Module) else []


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for item in items:
        if item is not None and id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


class _Step(nn.Module):
    """The modules with trainable parameters, so DistributedDataParallel can wrap one forward."""

    def __init__(self, trainer: Trainer, modules: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        object.__setattr__(self, "trainer", trainer)

    def forward(self, x: Tensor, batch: Batch) -> Tensor:
        return self.trainer._compute(x, batch)


class _Progress:
    """A rich progress bar on a terminal; plain lines when not a TTY, when ``CI`` is set, or
    when ``plain=True``."""

    REDRAW_S = 0.1

    def __init__(self, *, enabled: bool, total: int | None, plain: bool | None = None):
        self.enabled = enabled
        self.total = total
        self.bar = None
        self.task = None
        self._pending, self._drawn = 0, 0.0
        if plain is None:
            plain = not sys.stdout.isatty() or bool(os.environ.get("CI"))
        self.plain = plain
        if enabled and not plain:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)

    def start(self, completed: int) -> None:
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=completed,
                                          epoch=0, loss="-", rate="")

    def advance(self, epoch: int) -> None:
        """One step done; the bar is redrawn at most every ``REDRAW_S`` seconds (a redraw costs
        more than a small model's step)."""
        if self.bar is None:
            return
        self._pending += 1
        now = time.perf_counter()
        if now - self._drawn >= self.REDRAW_S:
            self.bar.update(self.task, advance=self._pending, epoch=epoch)
            self._pending, self._drawn = 0, now

    def log(self, *, epoch: int, step: int, loss: float, rate: float, eta: float | None,
            extra: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{loss:.4f}", rate=f"{rate:.0f} samples/s")
            return
        total = f"/{self.total}" if self.total else ""
        eta_s = f" eta {eta:.0f}s" if eta is not None else ""
        print(f"epoch {epoch} step {step}{total} loss {loss:.4f} {rate:.0f} samples/s{eta_s}"
              f"{extra}", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=self._pending)
            self._pending = 0
            self.bar.stop()


class Trainer:
    """Trains ``encoder`` with ``objective``; see the module docstring for one step.

    ``optimizer``: ``None`` (AdamW, lr 1e-3), a factory ``params -> Optimizer`` (e.g.
    ``functools.partial(torch.optim.SGD, lr=0.1)``), or an Optimizer (trainable parameters it
    does not hold are added as a new group with its defaults). Every parameter that requires
    grad in the encoder, objective, teacher, sampler, reweighter, transforms and callbacks is
    optimised once. ``scheduler``: an LR scheduler, a factory ``optimizer -> scheduler`` or an
    sdk Schedule (an LR multiplier of the step); stepped after every optimizer step.

    ``transforms``: ``None`` (the input is the only view), a Transform applied once per view the
    objective requires, or a sequence of Transforms, one per view. ``sampler``: a pair Sampler
    (given to every objective term that has an empty ``sampler`` slot) or a data-level
    ``torch.utils.data.Sampler`` (replaces the sampler of a map-style training DataLoader; an sdk
    :class:`~sdk.interfaces.DataSampler` is first told the training set (``bind``), and its
    ``on_fit_start``/``on_epoch_start`` events run before the epoch's batches are drawn). Under
    DDP each rank takes every ``world``-th index of the data sampler's order
    (:class:`RankShard`), which must then be the same on every rank; a DataSampler that shards
    itself over the ranks declares ``shards_ranks = True`` and is used as it is.

    The settings after ``progress`` (``max_epochs``, ``precision``, ...) are the fields of
    :class:`sdk.config.TrainerConfig`, checked as a recipe's ``[trainer]`` table is; ``config``
    holds them.

    ``max_steps`` counts optimizer steps; without it, ``total_steps`` (what LR schedules and
    ``set_progress`` see) is ``max_epochs * ceil(len(loader) / accumulate)``, measured once after
    ``on_fit_start``: for a data sampler whose length changes between epochs it is an estimate.
    ``log_every`` steps between log lines (the only host
    syncs); ``checkpoint_every`` steps between checkpoints (``None``: at epoch ends only;
    checkpoints need ``run_dir``). ``progress``: ``None`` shows progress on rank 0, ``False``
    is silent.

    A run that stops inside an epoch (``max_steps`` reached, or ``should_stop`` set by an
    event) has not finished that epoch: ``on_epoch_end`` does not fire, ``epoch`` stays, and
    the checkpoint records the loader position, so ``fit(resume=True)`` with a larger
    ``max_steps`` continues the same epoch with the next batch, exactly as an uninterrupted run
    would. Validation still runs at such a stop (``on_validation_end`` fires) and the loss of
    the epoch's batches so far is logged as an epoch record marked ``partial``.

    **Distributed training.** Launch the same script with ``torchrun``: the Trainer joins the
    process group torchrun describes (NCCL on CUDA, gloo on the CPU), wraps the trainable
    modules in ``DistributedDataParallel``, shards a map-style training loader over the ranks
    itself (seeded shuffling, as ``DistributedSampler`` does; ``batch_size`` is per rank),
    averages the gradients of parameters outside the wrapped modules (callbacks, samplers), and
    logs and writes checkpoints on rank 0 only (a checkpoint holds every rank's generators).
    Batch-coupled objectives gather by default (``gather="auto"``): each rank's anchors are
    contrasted against every rank's embeddings, which reproduces the gradients of one process
    on the whole global batch.
    One machine with 8 devices::

        torchrun --nproc_per_node 8 train.py

    Several machines: run on each node, with its ``--node_rank`` (0 to N-1) and the same
    rendezvous address::

        torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \
            --master_addr 10.0.0.1 --master_port 29500 train.py

    For ``resume=True``, ``run_dir`` must be on storage that every node can read.
    """

    @with_trainer_settings
    def __init__(self, encoder: nn.Module, objective: Objective, optimizer: Any = None, *,
                 teacher: Teacher | None = None, sampler: Any = None,
                 reweighter: nn.Module | None = None,
                 transforms: Transform | Sequence[Transform] | None = None,
                 unlabeled_transforms: Transform | Sequence[Transform] | None = None,
                 callbacks: Sequence[Any] = (), scheduler: Any = None, seed: int = 0,
                 run_dir: str | os.PathLike | None = None, progress: bool | None = None,
                 **settings: Any):
        if not isinstance(encoder, nn.Module):
            raise ConfigError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}",
                              param="encoder")
        if not isinstance(objective, Objective):
            raise ConfigError(f"objective must be an sdk Objective, got {type(objective).__name__}",
                              param="objective")
        if teacher is not None and not isinstance(teacher, Teacher):
            raise ConfigError(f"teacher must be an sdk Teacher, got {type(teacher).__name__}",
                              param="teacher")
        if isinstance(settings.get("device"), torch.device):
            settings["device"] = str(settings["device"])
        self.config = trainer_config(settings)
        if self.config.max_epochs is None and self.config.max_steps is None:
            raise ConfigError("give max_epochs or max_steps (or both)", param="max_epochs")
        self.encoder, self.objective, self.teacher = encoder, objective, teacher
        self.reweighter = reweighter
        self.pair_sampler = sampler if isinstance(sampler, PairSampler) else None
        self.data_sampler = sampler if isinstance(sampler, torch.utils.data.Sampler) else None
        if sampler is not None and self.pair_sampler is None and self.data_sampler is None:
            raise ConfigError(f"sampler must be an sdk Sampler (pairs) or a torch.utils.data."
                              f"Sampler, got {type(sampler).__name__}", param="sampler")
        if self.pair_sampler is not None:
            self._give_sampler(self.pair_sampler)
        self.callbacks = list(callbacks)
        self.view_transforms = self._view_transforms(transforms)
        self.unlabeled_transforms: list[Transform | None] = (
            [None] if unlabeled_transforms is None else [unlabeled_transforms]
            if isinstance(unlabeled_transforms, nn.Module) else list(unlabeled_transforms))
        check_parts(objective, teacher=teacher, transforms=self.view_transforms)
        self.optimizer_spec, self.scheduler_spec = optimizer, scheduler
        for name, value in attrs.asdict(self.config, recurse=False).items():
            setattr(self, name, value)
        self.device = resolve_device(self.config.device)
        self._on_cpu = self.device.type == "cpu"
        self._host_window = self._on_cpu  # the log window holds floats (see _window below)
        self._skip_nonfinite = self.on_nonfinite == "skip"
        if self.precision == "fp16-mixed" and self.device.type != "cuda":
            raise ConfigError(f"precision 'fp16-mixed' (float16 with a GradScaler) needs a CUDA "
                              f"device, got {self.device}; use 'bf16-mixed' on the CPU",
                              param="precision")
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress_enabled = progress

        # loop state, visible to events (step, epoch and the micro-batch's records live in state)
        self.state = State(trainer=self, model=encoder)
        self.batch_idx = 0
        self.total_steps: int | None = self.max_steps
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.train_loader: Any = None
        self.val_loader: Any = None
        self.unlabeled_loader: Any = None
        self._view_inputs: tuple[list[Tensor], Batch] | None = None
        # semi-supervised fits: the unlabelled loader's stream, where it stands between fits,
        # and the step's unlabelled view inputs and indices (what recompute_gradients reruns)
        self._unlabeled: UnlabeledStream | None = None
        self._unlabeled_at = (0, 0)
        self._unlabeled_inputs: tuple[list[Tensor], Tensor | None] | None = None
        self.logs: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.should_stop = False
        self.grad_norm: Tensor | None = None
        self._listeners: dict[str, tuple[Callable[[State], Any], ...]] = {}
        self._attached = False
        self._checked = False  # the first micro-batch's records are validated, later ones trusted
        # the log window, one entry per micro-batch: its loss, the step it is part of, its term
        # logs and its number of samples; and the epoch's sum and count of logged losses (a host
        # float: log points read the window's sum anyway). On an accelerator a loss stays a
        # detached tensor on the device (summed at log points, so a step costs no host sync);
        # on the CPU, where reading it syncs nothing, it is a float (``tolist``: no detached
        # copy, no warning for a tensor that requires grad), and a log point costs no tensor op
        self._window: list[tuple[Tensor | float, int, Mapping[str, Tensor], int]] = []
        self._epoch_sum = 0.0
        self._epoch_count = 0
        # the non-finite guard: the newest checkpoint written (each written after the guard
        # passed), updates dropped by on_nonfinite="skip", and the step's finite flag (skip only)
        self._last_good: Path | None = None
        self.skipped_steps = 0
        self._step_ok: Tensor | None = None
        self._start_step = 0
        self._setup_done = False
        self._ddp: nn.Module | None = None

    # construction helpers ----------------------------------------------------------------
    def _give_sampler(self, sampler: PairSampler) -> None:
        slots = [m for m in self.objective.modules()
                 if isinstance(m, Objective) and m.accepts_sampler and m.sampler is None]
        if not slots:
            raise ConfigError("sampler: no objective term takes a pair sampler (or every one "
                              "already has one)", param="sampler")
        for term in slots:
            check_composition(term, sampler)
        for term in slots:
            term.sampler = sampler

    def _view_transforms(self, transforms: Any) -> list[Transform | None]:
        need = int(self.objective.requires.get("views", 1) or 1)
        if transforms is None:
            if need > 1:
                raise RequirementError(f"objective {self.objective.name!r} needs {need} views; "
                                       "pass transforms= (one Transform, applied once per view, "
                                       "or one per view)")
            return [None]
        if isinstance(transforms, nn.Module) or callable(transforms) and not isinstance(
                transforms, Sequence):
            return [transforms] * need
        transforms = list(transforms)
        if len(transforms) < need:
            raise RequirementError(f"objective {self.objective.name!r} needs {need} views, but "
                                   f"{len(transforms)} transforms were given (one per view)")
        return transforms

    @property
    def components(self) -> list[Any]:
        """Every object the engine drives (deduplicated)."""
        return _unique([self.encoder, self.objective, self.teacher, self.pair_sampler,
                        self.reweighter, *[t for t in self.view_transforms if t is not None],
                        *[t for t in self.unlabeled_transforms if t is not None],
                        self.data_sampler, *self.callbacks])

    @property
    def model(self) -> nn.Module:
        """The encoder being trained (unwrapped)."""
        return self.encoder

    @property
    def step(self) -> int:
        """Optimizer steps taken (``state.step``)."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def epoch(self) -> int:
        """The current epoch (``state.epoch``)."""
        return self.state.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.state.epoch = value

    @property
    def x(self) -> Tensor | None:
        """The current micro-batch's input (``state.x``)."""
        return self.state.x

    @property
    def view_inputs(self) -> list[Tensor] | None:
        """The current micro-batch's input of each view, after the view transforms (what the
        encoder ran on); for ``after_forward`` listeners that encode more inputs built from
        them (mixed views)."""
        return None if self._view_inputs is None else self._view_inputs[0]

    @property
    def batch(self) -> Batch | None:
        """The current micro-batch's Batch (``state.batch``; listeners replace it there)."""
        return self.state.batch

    @property
    def views(self) -> Views | None:
        """The current micro-batch's Views (``state.views``; listeners replace it there)."""
        return self.state.views

    @property
    def loss(self) -> Loss | None:
        """The current micro-batch's Loss (``state.loss``; listeners replace it there)."""
        return self.state.loss

    def _listening(self) -> list[Any]:
        """Every object whose event methods run: the components and the objective's terms and
        pair samplers."""
        inner = [m for m in self.objective.modules() if isinstance(m, (Objective, PairSampler))]
        return _unique([*self.components, *inner])

    def recompute_gradients(self) -> Tensor:
        """Forward and backward the current step's batch again at the parameters' current
        values, replacing the gradients, and return the (detached) loss.

        For listeners of ``before_optimizer_step`` that need the gradient at other parameter
        values (sharpness-aware minimisation evaluates it at perturbed weights). The pass reuses
        the step's view inputs and batch (transforms are not drawn again), fires no events,
        averages the gradients over ranks, and leaves every component's buffers (batch-norm
        statistics, per-sample state) and the ``views``, ``batch`` and ``loss`` records as the
        step's own pass left them. Needs ``accumulate=1`` and no GradScaler (``fp16-mixed``).
        """
        if self.accumulate != 1:
            raise RequirementError(f"recompute_gradients needs accumulate=1 (it reruns one "
                                   f"micro-batch), got accumulate={self.accumulate}")
        if self.scaler is not None:
            raise RequirementError("recompute_gradients does not support precision 'fp16-mixed' "
                                   "(its gradients are unscaled once per step); use 'bf16-mixed'")
        if self._view_inputs is None:
            raise RuntimeError("recompute_gradients reruns the current step: call it from "
                               "before_optimizer_step")
        xs, batch = self._view_inputs
        buffers = _unique(b for m in self.components if isinstance(m, nn.Module) for b in m.buffers())
        saved = [b.clone() for b in buffers]
        records = (self.state.views, self.state.batch, self.state.loss)
        for p in self.params:
            p.grad = None
        with self._autocast():
            value = self._views_and_loss(xs, batch, events=False, unlabeled=self._unlabeled_inputs)
        value.backward()
        if self._ddp is not None:
            distributed.all_reduce_mean_([p.grad for p in self.params if p.grad is not None])
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
        self.state.views, self.state.batch, self.state.loss = records
        return value.detach()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad across all components, each once."""
        params: list[nn.Parameter] = []
        for comp in self.components:
            if isinstance(comp, nn.Module):
                params.extend(p for p in comp.parameters() if p.requires_grad)
        return _unique(params)

    # set-up ------------------------------------------------------------------------------
    def _setup(self) -> None:
        if self._setup_done:
            return
        self.distributed = distributed.init()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        for comp in self.components:
            if isinstance(comp, nn.Module):
                comp.to(self.device)
        self._plan()
        self._encode = torch.compile(self._encode_impl) if self.compile else self._encode_impl
        self._encode_z = torch.compile(self.encoder) if self.compile else self.encoder

        params = self.trainable_parameters()
        if not params:
            raise ConfigError("nothing to train: no parameter requires grad", param="encoder")
        self.params = params
        self.optimizer = self._build_optimizer(params)
        self.scheduler = self._build_scheduler()
        self.scaler = (torch.amp.GradScaler("cuda") if self.precision == "fp16-mixed" else None)
        amp_dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(self.precision)
        self._amp = amp_dtype is not None
        self._autocast: Callable[[], Any]
        if amp_dtype is None:
            self._autocast = contextlib.nullcontext
        else:
            dev = self.device.type

            def _autocast() -> Any:
                return torch.autocast(device_type=dev, dtype=amp_dtype)

            self._autocast = _autocast
        self.state.optimizer = self.optimizer
        if self.distributed:
            self._wrap_ddp(params)
        self._bare = self._ddp is None and not self._amp
        self._checked_update = self.clip_grad_norm is not None or self._skip_nonfinite
        self._setup_done = True

    def _plan(self) -> None:
        """What one forward computes: attach the teacher (once), and decide from the declared
        capabilities which extras the Views get (shared by training and :meth:`evaluate`)."""
        teacher = self.teacher
        if teacher is not None and not self._attached:
            teacher.attach(self.encoder)
            teacher.to(self.device)
        self._attached = True
        self._teacher_forward = teacher is not None and teacher.encodes_views
        self._teacher_observes = teacher is not None and teacher.observes
        self._memory = teacher.memory if teacher is not None else None
        enc = self.encoder
        self._split = isinstance(enc, Encoder) and enc.head is not None
        self.objective.request_per_sample(self.reweighter is not None or any(
            isinstance(c, Callback) and c.reads_per_sample_loss for c in self.callbacks))
        needs = self.objective.requires
        self._needs_logits = bool(needs.get("logits"))
        self._needs_features = keys.FEATURES in tuple(needs.get("extras", ()))
        if self._needs_features and not isinstance(enc, Encoder):
            raise RequirementError(f"objective {self.objective.name!r} needs "
                                   f"extras[{keys.FEATURES!r}] but the encoder "
                                   f"({type(enc).__name__}) is not an sdk Encoder with features(x)")
        self._plain = not (self._teacher_forward or self._split or self._needs_features)
        self._untransformed = all(t is None for t in self.view_transforms)
        # set_progress is told only to objectives that override it (schedules, compositions)
        self._tells_progress = type(self.objective).set_progress is not Objective.set_progress

    def _wrap_ddp(self, params: list[nn.Parameter]) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        owners = [m for m in _unique([self.encoder, self.objective, self.teacher,
                                      self.reweighter, *self.view_transforms,
                                      *self.unlabeled_transforms])
                  if isinstance(m, nn.Module) and any(p.requires_grad for p in m.parameters())]
        step = _Step(self, owners)
        inside = {id(p) for p in step.parameters()}
        self._outside = [p for p in params if id(p) not in inside]
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (per-sample memories, running statistics) stay per rank during training
        buffers = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        self._ddp = DDP(step, device_ids=ids, **buffers)
        with torch.no_grad():  # parameters outside DDP start equal on every rank too
            for p in self._outside:
                torch.distributed.broadcast(p, src=0)

    def _build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        spec = self.optimizer_spec
        if spec is None:
            return torch.optim.AdamW(params, lr=1e-3)
        if isinstance(spec, torch.optim.Optimizer):
            held = {id(p) for g in spec.param_groups for p in g["params"]}
            missing = [p for p in params if id(p) not in held]
            if missing:
                spec.add_param_group({"params": missing})
            return spec
        if callable(spec):
            opt = spec(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise ConfigError(f"optimizer factory returned {type(opt).__name__}, expected a "
                                  "torch.optim.Optimizer", param="optimizer")
            return opt
        raise ConfigError(f"optimizer must be None, an Optimizer or a factory params -> "
                          f"Optimizer, got {type(spec).__name__}", param="optimizer")

    def _build_scheduler(self) -> Any:
        spec = self.scheduler_spec
        if spec is None:
            return None
        if isinstance(spec, Schedule):
            return torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: spec(s, self.total_steps))
        if isinstance(spec, torch.optim.lr_scheduler.LRScheduler):
            return spec
        if callable(spec):
            return spec(self.optimizer)
        raise ConfigError(f"scheduler must be an LR scheduler, a factory or an sdk Schedule, got "
                          f"{type(spec).__name__}", param="scheduler")

    def _collect_listeners(self) -> None:
        """Every event's listeners, in order: components' methods, then plugin modules' hooks.
        Raises :class:`ConfigError` for a method or hook named like an event that is none."""
        listeners: dict[str, list[Callable[[State], Any]]] = {event: [] for event in EVENTS}
        for comp in self._listening():
            for event, method in listener_methods(comp).items():
                listeners[event].append(method)
        from sdk.registry import get_registry

        hooks = vars(get_registry().plugin_manager.hook)
        for name, hook in hooks.items():
            if name.startswith(PREFIX) and hook.spec is None and hook.get_hookimpls():
                plugins = ", ".join(impl.plugin_name for impl in hook.get_hookimpls())
                near = closest(name[len(PREFIX):])
                hint = f" (closest: {hook_name(near)!r})" if near else ""
                raise ConfigError(f"plugin {plugins}: hook {name!r} is no engine event{hint}",
                                  param=name)
        for event in EVENTS:
            hook = hooks.get(hook_name(event))
            if hook is not None and hook.get_hookimpls():
                listeners[event].append(lambda state, hook=hook: hook(state=state))
        self._listeners = {event: tuple(found) for event, found in listeners.items()}
        # the per-step events, resolved once (the loop iterates these tuples directly)
        self._after_forward = self._listeners[Event.AFTER_FORWARD]
        self._after_loss = self._listeners[Event.AFTER_LOSS]
        self._before_backward = self._listeners[Event.BEFORE_BACKWARD]
        self._before_optimizer_step = self._listeners[Event.BEFORE_OPTIMIZER_STEP]
        self._after_optimizer_step = self._listeners[Event.AFTER_OPTIMIZER_STEP]

    def emit(self, event: Event | str) -> None:
        """Dispatch ``event`` to every listener (callbacks, components, plugin hooks) with the
        run's :class:`State`."""
        state = self.state
        for listener in self._listeners[event]:
            listener(state)

    # data --------------------------------------------------------------------------------
    def _prepare_train_loader(self, loader: Any) -> Any:
        """Rebuild a map-style DataLoader around a :class:`ResumableSampler` (seeded shuffling,
        rank sharding, skippable prefix); other loaders are used as they are."""
        self._resumable: ResumableSampler | None = None
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            return loader
        if self.data_sampler is not None:
            sampler: Any = self.data_sampler
            own = isinstance(sampler, DataSampler)
            if own:  # a data sampler may learn the training set (e.g. its size)
                sampler.bind(loader.dataset)
            if self.world > 1 and not (own and sampler.shards_ranks):
                sampler = RankShard(sampler, rank=self.rank, world=self.world)
        else:
            loader, self._resumable = self._resumable_loader(loader, self.seed)
            return loader
        return self._rebuild(loader, sampler)

    def _resumable_loader(self, loader: Any, seed: int) -> tuple[Any, ResumableSampler | None]:
        """A map-style DataLoader that shuffles plainly or not at all, rebuilt around a
        :class:`ResumableSampler` seeded with ``seed`` (and its sampler); others as they are."""
        plain = isinstance(loader, DataLoader) and loader.batch_size is not None and (
            type(loader.sampler) is SequentialSampler or type(loader.sampler) is RandomSampler
            and not loader.sampler.replacement and loader.sampler._num_samples is None)
        if not plain:
            return loader, None
        sampler = ResumableSampler(len(loader.dataset),
                                   shuffle=isinstance(loader.sampler, RandomSampler),
                                   seed=seed, rank=self.rank, world=self.world)
        return self._rebuild(loader, sampler), sampler

    def _start_unlabeled(self, loader: Any) -> None:
        """The stream of a fit's unlabelled loader (``None``: a supervised fit), after checking
        that something in the run reads it and that an objective needing it gets it."""
        wants = bool(self.objective.requires.get("unlabeled"))
        if loader is None:
            self._unlabeled = None
            if wants:
                raise RequirementError(f"objective {self.objective.name!r} learns from unlabelled "
                                       f"data: pass fit(..., unlabeled=loader)")
            return
        if not wants and not any(isinstance(c, Callback) and c.reads_unlabeled
                                 for c in self.callbacks):
            raise ConfigError(f"fit(unlabeled=...): neither objective {self.objective.name!r} nor "
                              f"a callback reads unlabelled data (Objective.requires['unlabeled'], "
                              f"Callback.reads_unlabeled)", param="unlabeled")
        loader, sampler = self._resumable_loader(loader, self.seed + UNLABELED_SEED)
        self._unlabeled = UnlabeledStream(loader, sampler, seed=self.seed + UNLABELED_SEED,
                                          position=self._unlabeled_at)

    def _draw_unlabeled(self) -> tuple[list[Tensor], Tensor | None]:
        """The next unlabelled batch: its input through each unlabelled transform, and its
        dataset indices (its targets, if it has any, are not used)."""
        x, batch = self._to_device(self._unlabeled.next(), check=not self._checked)
        return [x if t is None else t(x, batch)[0] for t in self.unlabeled_transforms], batch.index

    def _rebuild(self, loader: DataLoader, sampler: Any, **overrides: Any) -> DataLoader:
        kwargs: dict[str, Any] = dict(
            batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, drop_last=loader.drop_last, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            pin_memory=loader.pin_memory or self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed))
        if loader.num_workers > 0:
            kwargs.update(prefetch_factor=loader.prefetch_factor,
                          persistent_workers=loader.persistent_workers,
                          multiprocessing_context=loader.multiprocessing_context)
        kwargs.update(overrides)
        return DataLoader(loader.dataset, **kwargs)

    def _ordered(self, loader: Any) -> Any:
        """The same dataset, in dataset order, every sample once (for embed / predict)."""
        if isinstance(loader, DataLoader) and loader.batch_size is not None:
            if type(loader.sampler) is SequentialSampler and not loader.drop_last:
                return loader
            return self._rebuild(loader, SequentialSampler(loader.dataset), drop_last=False)
        return loader

    def _to_device(self, item: Any, check: bool = True) -> tuple[Tensor, Batch]:
        """The input and the Batch of a loader item, on the device; ``check=False`` builds the
        Batch without validating it (training after the first micro-batch)."""
        kind = type(item)
        if (not check and self._on_cpu and (kind is tuple or kind is list) and len(item) == 3
                and item[0].is_cpu):  # a CPU loader's (x, targets, index): the common case
            return item[0], _unchecked_batch(targets=item[1], index=item[2])
        make = Batch if check else _unchecked_batch
        fields: dict[str, Any] = {}
        if isinstance(item, (tuple, list)):
            x = item[0]
            if len(item) == 2 and isinstance(item[1], Batch):
                batch = item[1]
                fields = {"targets": batch.targets, "index": batch.index, "domain": batch.domain,
                          "weight": batch.weight, "extras": batch.extras}
            else:
                fields = dict(zip(_ITEM_FIELDS, item[1:4]))
        elif isinstance(item, Mapping):
            x = item["x"]
            fields = {k: v for k, v in item.items() if k in _BATCH_FIELDS}
            extras = {k: v for k, v in item.items() if k != "x" and k not in _BATCH_FIELDS}
            if extras:
                fields["extras"] = extras
        else:
            x = item
        if self._on_cpu and x.is_cpu and "extras" not in fields:
            return x, make(**fields)  # a CPU loader's tensors are already where they belong
        dev = self.device
        nb = dev.type == "cuda"

        def move(t: Tensor) -> Tensor:
            return t if t.device == dev else t.to(dev, non_blocking=nb)

        x = move(x)
        for key, value in fields.items():
            if isinstance(value, Tensor):
                fields[key] = move(value)
        if "extras" in fields:
            fields["extras"] = {k: move(v) if isinstance(v, Tensor) else v
                                for k, v in fields["extras"].items()}
        return x, make(**fields)

    # forward -----------------------------------------------------------------------------
    def _encode_impl(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        enc = self.encoder
        if self._split:
            h = enc.features(x)
            return enc.head(h), h
        z = enc(x)
        return z, enc.features(x) if self._needs_features else None

    def _compute(self, x: Tensor, batch: Batch, events: bool = True) -> Tensor:
        """The objective's loss on one micro-batch; with ``events`` (training) the
        ``after_forward`` and ``after_loss`` listeners run and what they put in the state is
        used."""
        if self._untransformed:
            xs = [x] * len(self.view_transforms)
        else:
            xs = []
            for t in self.view_transforms:
                if t is None:
                    xs.append(x)
                else:
                    xv, batch = t(x, batch)
                    xs.append(xv)
        self._view_inputs = (xs, batch)  # what recompute_gradients runs again
        self._unlabeled_inputs = (self._draw_unlabeled() if events and self._unlabeled is not None
                                  else None)
        self.state.x = x
        return self._views_and_loss(xs, batch, events, unlabeled=self._unlabeled_inputs)

    def _encode_views(self, xs: list[Tensor]) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
        """The embeddings of every view and the extras beside them (features, teacher outputs)."""
        if self._plain:  # the encoder's output per view, nothing else
            return tuple(map(self._encode_z, xs)), {}
        embeddings, features, teacher = [], [], []
        for xv in xs:
            z, h = self._encode(xv)
            embeddings.append(z)
            if h is not None:
                features.append(h)
            if self._teacher_forward:
                teacher.append(self.teacher(xv))
        extras: dict[str, Any] = {}
        if features:
            extras[keys.FEATURES] = tuple(features)
        if teacher:
            extras[keys.TEACHER] = tuple(teacher)
        return tuple(embeddings), extras

    def _views_and_loss(self, xs: list[Tensor], batch: Batch, events: bool,
                        unlabeled: tuple[list[Tensor], Tensor | None] | None = None) -> Tensor:
        embeddings, extras = self._encode_views(xs)
        if self._memory is not None:
            extras.update(self._memory())
        if unlabeled is not None:  # the encoder's outputs on each unlabelled view
            us, index = unlabeled
            extras[keys.UNLABELED] = tuple(self._encode(u)[0] for u in us)
            if index is not None:
                extras[keys.UNLABELED_INDEX] = index
        logits = embeddings[0] if self._needs_logits else None
        if logits is not None and logits.dim() == 3:  # a sequence model's [B, T, V]
            embeddings = ()
        trusted = events and self._checked  # training after the first, validated micro-batch
        views = (_unchecked_views if trusted else Views)(embeddings=embeddings, extras=extras,
                                                          logits=logits)
        state = self.state
        state.batch, state.views = batch, views
        if events and self._after_forward:
            for listener in self._after_forward:
                listener(state)
            views, batch = state.views, state.batch  # as listeners left them
        # the objective's requirements hold for every batch once they held for the first
        loss = nn.Module.__call__(self.objective, views, batch) if trusted else self.objective(
            views, batch)
        if self.reweighter is not None:
            loss = self.reweighter.reduce(loss, batch)
        state.loss = loss
        if events and self._after_loss:
            for listener in self._after_loss:  # may replace state.loss (e.g. add a term)
                listener(state)
        return state.loss.value

    # the loop ----------------------------------------------------------------------------
    def fit(self, train_loader: Any, val_loader: Any = None, *, unlabeled: Any = None,
            resume: bool | str | os.PathLike = False) -> Trainer:
        """Train; ``resume=True`` continues from ``run_dir``'s checkpoint when there is one,
        ``resume=PATH`` from that checkpoint (file or run directory).

        ``unlabeled``: a loader of unlabelled samples (semi-supervised learning). Every labelled
        micro-batch is joined by its next batch, drawn epoch after epoch on its own
        (:class:`UnlabeledStream`; a map-style DataLoader is reshuffled, sharded over the ranks
        and resumed as the training loader is, seeded apart from it), put through
        ``unlabeled_transforms`` (one view per transform: weak, then strong), encoded, and given
        to the objective as ``Views.extras[keys.UNLABELED]`` (one ``[U, D]`` tensor per view)
        and ``[keys.UNLABELED_INDEX]`` (its indices). ``mu``, the ratio of unlabelled to
        labelled samples per step, is the ratio of the two loaders' batch sizes. The objective
        (``requires["unlabeled"]``) or a callback (``reads_unlabeled``) must read it.

        An exception raised inside a plugin (an event listener, the objective or one of its
        terms, a pair sampler, the teacher, a transform, a reweighter, a plugin module's hook)
        is re-raised as a :class:`~sdk.errors.PluginFailure` naming it and the event or call
        (see :mod:`sdk.faults`); the checkpoints written before it are intact."""
        try:
            return self._fit(train_loader, val_loader, unlabeled, resume)
        except Exception as exc:
            from sdk.registry import get_registry

            failure = faults.blame(exc, faults.plugin_objects(self._listening(), self.encoder),
                                   faults.hook_code(get_registry().plugin_manager),
                                   faults.listener_code(self._listeners))
            if failure is None:
                raise
            raise failure from exc

    def _fit(self, train_loader: Any, val_loader: Any, unlabeled: Any,
             resume: bool | str | os.PathLike) -> Trainer:
        fresh = not self._setup_done
        self._setup()
        if fresh:
            ckpt.seed_everything(self.seed + self.rank)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.unlabeled_loader = unlabeled
        self._collect_listeners()
        self._checked = False  # validate this fit's first micro-batch (its loader may differ)
        per_step = (self._after_forward, self._after_loss, self._before_backward,
                    self._before_optimizer_step, self._after_optimizer_step)
        self._plain_loop = (self._bare and self._plain and self._untransformed
                            and self.accumulate == 1 and not self._checked_update
                            and self.teacher is None and self.reweighter is None
                            and unlabeled is None and not any(per_step))
        loader = self._prepare_train_loader(train_loader)
        self._start_unlabeled(unlabeled)
        if self.max_steps is None and not isinstance(loader, Sized):
            raise ConfigError("the training loader has no length: give max_steps",
                              param="max_steps")
        self.emit(Event.ON_FIT_START)
        if self.max_steps is None:  # measured after on_fit_start: a data sampler may size itself there
            self.total_steps = self.max_epochs * math.ceil(len(loader) / self.accumulate)
        path = self._resume_path(resume)
        skip = self.batch_idx  # a previous fit of this trainer stopped inside an epoch
        if path is not None:
            skip = self.load_checkpoint(path)
        self._start_logging(resumed=path is not None)
        progress = _Progress(enabled=self.is_main and self.progress_enabled is not False,
                             total=self.total_steps)
        progress.start(self.step)
        self._start_step = self.step
        self._t_start = self._t_log = time.perf_counter()
        try:
            self._loop(loader, skip, progress)
        finally:
            progress.stop()
            if self._unlabeled is not None:  # a later fit continues where this one stopped
                self._unlabeled_at = self._unlabeled.position
        if self.is_main and self.run_dir is not None:
            self._write_summary()
        self.emit(Event.ON_FIT_END)
        return self

    def _done(self) -> bool:
        total = self.total_steps
        return self.should_stop or (total is not None and self.state.step >= total)

    def _loop(self, loader: Any, skip: int, progress: _Progress) -> None:
        while not self._done() and (self.max_epochs is None or self.epoch < self.max_epochs):
            if self._resumable is not None:
                self._resumable.set_epoch(self.epoch)
                self._resumable.skip(skip * (loader.batch_size or 0))
            elif isinstance(loader, DataLoader):
                set_epoch(loader.sampler, self.epoch)
            if loader is not self.train_loader:  # rebuilt here: its generator seeds the workers
                loader.generator.manual_seed(self.seed + self.epoch)
            if skip == 0:
                self.batch_idx = 0
                self.emit(Event.ON_EPOCH_START)
                self._window, self._epoch_sum, self._epoch_count = [], 0.0, 0
            n_batches = len(loader) if isinstance(loader, Sized) else None
            it = iter(loader)
            if self._resumable is None:
                for _ in range(skip):  # fast-forward a loader whose order the engine does not own
                    next(it)
            skip = 0
            ended = (self._plain_steps(it, progress) if self._plain_loop
                     else self._steps(it, n_batches, progress))
            if ended or n_batches is not None and self.batch_idx >= n_batches:
                self._end_epoch(progress)
            else:
                self._stop_mid_epoch(progress)

    def _steps(self, it: Iterator[Any], n_batches: int | None, progress: _Progress) -> bool:
        """Train on the epoch's batches (``it``, ``n_batches`` of them when known) until it
        ends (``True``) or the run stops."""
        pending = 0
        for item in it:
            pending += 1
            # the last batch of an epoch closes a partial accumulation
            boundary = pending == self.accumulate or self.batch_idx + 1 == n_batches
            self._micro_step(item, boundary=boundary)
            if boundary:
                self._optimizer_step(pending)
            self.batch_idx += 1
            if boundary:
                pending = 0
                self._after_step(progress)
                if self._done():
                    return False
        if pending:  # a loader without a length ended inside an accumulation
            self._optimizer_step(pending)
            self._after_step(progress)
        return True

    def _plain_steps(self, it: Iterator[Any], progress: _Progress) -> bool:
        """:meth:`_steps` where nothing sits between the steps' parts (``_plain_loop``: one
        micro-batch per step, the encoder's outputs straight into the objective; no listener of
        a per-step event, teacher, reweighter, clipping, non-finite check, autocast or DDP). It
        computes what :meth:`_steps` does, in the same order, in a fraction of its Python per
        step (the engine's fixed cost); a test holds the two equal."""
        state, objective, optimizer = self.state, self.objective, self.optimizer
        encode, scheduler = self._encode_z, self.scheduler
        n_views, logits, tells = len(self.view_transforms), self._needs_logits, self._tells_progress
        host = self._host_window
        # torch's condition for calling forward directly (see _GLOBAL_MODULE_HOOKS), read every
        # step: a hook registered during the run (by a log listener, a forward) is honoured
        own, world_hooks = objective.__dict__, _GLOBAL_MODULE_HOOKS
        direct = world_hooks is not None and all(name in own for name in _OWN_MODULE_HOOKS)
        g1, g2, g3, g4 = world_hooks if direct else ((),) * 4
        tracing = torch._C._get_tracing_state
        due = self._next_due(progress)
        self._view_inputs = None  # recompute_gradients: only from before_optimizer_step
        for item in it:
            state.views = state.loss = None
            x, batch = self._to_device(item, check=not self._checked)
            if tells:
                objective.set_progress(state.step, self.total_steps)
            state.x = x
            embeddings = (encode(x),) if n_views == 1 else tuple(map(encode, [x] * n_views))
            first = embeddings[0] if logits else None
            if first is not None and first.dim() == 3:  # a sequence model's [B, T, V]
                embeddings = ()
            state.batch = batch
            if self._checked:
                state.views = views = _plain_views(embeddings=embeddings, logits=first)
                if direct and not (own["_backward_hooks"] or own["_backward_pre_hooks"]
                                   or own["_forward_hooks"] or own["_forward_pre_hooks"]
                                   or g1 or g2 or g3 or g4
                                   or own.get("_compiled_call_impl") is not None or tracing()):
                    state.loss = loss = objective.forward(views, batch)
                else:
                    state.loss = loss = nn.Module.__call__(objective, views, batch)
            else:
                state.views = views = Views(embeddings=embeddings, logits=first)
                state.loss = loss = objective(views, batch)
                self._checked = True
            value = loss.value
            value.backward()
            step = state.step + 1
            self._window.append((value.tolist() if host else value.detach(), step, loss.logs,
                                 x.shape[0]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state.step = step
            optimizer.zero_grad(set_to_none=True)
            self.batch_idx += 1
            if step >= due or self.should_stop:
                self._after_step(progress)
                if self._done():
                    return False
                due = self._next_due(progress)
        return True

    def _forward(self, x: Tensor, batch: Batch, *, boundary: bool) -> Tensor:
        """The loss under autocast and DDP (no gradient all-reduce before the ``boundary``)."""
        ddp = self._ddp
        with self._autocast(), ddp.no_sync() if ddp is not None and not boundary else _NULL:
            return ddp(x, batch) if ddp is not None else self._compute(x, batch)

    def _micro_step(self, item: Any, *, boundary: bool) -> None:
        state = self.state
        state.views = state.loss = None  # free the last step's activations before this forward
        x, batch = self._to_device(item, check=not self._checked)
        if self._tells_progress:
            self.objective.set_progress(state.step, self.total_steps)
        # the common case (neither DDP nor autocast) without context managers
        value = self._compute(x, batch) if self._bare else self._forward(x, batch, boundary=boundary)
        if self.accumulate > 1:
            value = value / self.accumulate
        for listener in self._before_backward:
            listener(state)
        (value if self.scaler is None else self.scaler.scale(value)).backward()
        if self._teacher_observes:
            self.teacher.observe(views=state.views, batch=state.batch, step=state.step,
                                 max_steps=self.total_steps)
        loss = state.loss
        value = loss.value.detach()
        # no host sync on an accelerator: the guard reads the window at log points
        self._window.append((value.tolist() if self._host_window else value, state.step + 1,
                             loss.logs, x.shape[0]))
        if self._skip_nonfinite:
            ok = torch.isfinite(value)
            self._step_ok = ok if self._step_ok is None else self._step_ok & ok
        self._checked = True

    def _optimizer_step(self, micro: int) -> None:
        """The update of the last ``micro`` micro-batches' gradients."""
        state = self.state
        if self._ddp is not None:
            distributed.all_reduce_mean_([p.grad for p in self._outside if p.grad is not None])
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        for listener in self._before_optimizer_step:
            listener(state)
        if self._checked_update:  # clipping and the non-finite check of "skip"
            if self.clip_grad_norm is not None:
                self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm,
                                                                foreach=True)
            if self._skip_nonfinite and not self._update_is_finite():
                self._drop_update(micro)
                return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        taken = state.step
        state.step = taken + 1
        for listener in self._after_optimizer_step:
            listener(state)
        if self.teacher is not None:
            observed = self._teacher_observes  # then every micro-batch was observed already
            self.teacher.update(student=self.encoder, views=None if observed else state.views,
                                batch=None if observed else state.batch, step=taken,
                                max_steps=self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)

    def _update_is_finite(self) -> bool:
        """Whether this step's losses and gradients are all finite (``on_nonfinite="skip"``):
        one flag computed on the device and read once per step (agreed across ranks)."""
        ok, self._step_ok = self._step_ok, None
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = self.grad_norm if self.clip_grad_norm is not None else (
            torch.stack(torch._foreach_norm(grads)).float().sum() if grads else None)
        if norm is not None:
            ok = torch.isfinite(norm) if ok is None else ok & torch.isfinite(norm)
        if ok is None:
            return True
        flag = ok.float()
        if self._ddp is not None:
            distributed.all_reduce_mean_([flag])
        return bool(flag == 1)

    def _drop_update(self, micro: int) -> None:
        """Skip this step's update (``on_nonfinite="skip"``): no optimizer step, no
        ``after_optimizer_step``, no teacher update; its losses leave the logged means; the
        step counter and the LR schedule advance."""
        self.skipped_steps += 1
        del self._window[-micro:]
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after an fp16 overflow
        if self.scheduler is not None:
            self.scheduler.step()
        self.state.step += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _guard(self) -> None:
        """``on_nonfinite="raise"``: raise :class:`~sdk.errors.NonFiniteError` when a loss of
        the log window is not finite (a host read; called where the loop reads anyway: log
        points, epoch ends, before each checkpoint, so no checkpoint holds a diverged run)."""
        if not self._window or self._skip_nonfinite:
            return
        values = self._window_values()
        if bool(torch.isfinite(values).all()):
            return
        first = int((~torch.isfinite(values)).nonzero()[0, 0])
        _, step, logs, _ = self._window[first]
        terms = {name: float(v) for name, v in logs.items()}
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in terms.items()) or "(no per-term logs)"
        good = str(self._last_good) if self._last_good is not None else None
        where = (f"the last good checkpoint is {good} (resume from it, e.g. with a lower "
                 f"learning rate)" if good else "no checkpoint was written before it")
        raise NonFiniteError(
            f"the loss of objective {self.objective.name!r} is {float(values[first])} at step "
            f"{step}; terms: {shown}; {where}. Set on_nonfinite='skip' to "
            f"drop such updates instead", step=step, terms=terms, checkpoint=good)

    def _save_guarded(self) -> None:
        self._guard()
        written = self.save_checkpoint()
        if written is not None:
            self._last_good = written

    def _after_step(self, progress: _Progress) -> None:
        step = self.state.step
        if progress.bar is not None:
            progress.advance(self.state.epoch)
        if step % self.log_every == 0:
            self._log_train(progress)
        if (self.checkpoint_every is not None and step % self.checkpoint_every == 0
                and self.run_dir is not None):
            self._save_guarded()

    def _next_due(self, progress: _Progress) -> float:
        """The first step after the current one whose end has work for :meth:`_after_step` (a
        log point, a checkpoint, a progress bar's advance: every step) or ends the run
        (``total_steps``): the plain loop runs a step's end only then, or when ``should_stop``
        is set."""
        step = self.state.step
        if progress.bar is not None:
            return step + 1
        due = [step - step % self.log_every + self.log_every]
        if self.checkpoint_every is not None and self.run_dir is not None:
            due.append(step - step % self.checkpoint_every + self.checkpoint_every)
        if self.total_steps is not None:
            due.append(max(self.total_steps, step + 1))
        return min(due)

    def _end_epoch(self, progress: _Progress) -> None:
        self.emit(Event.ON_EPOCH_END)
        self._validate_and_log_epoch(progress, partial=False)
        self.epoch += 1
        self.batch_idx = 0
        if self.run_dir is not None:
            self._save_guarded()

    def _stop_mid_epoch(self, progress: _Progress) -> None:
        """Stopped inside an epoch (``max_steps`` or ``should_stop``): the epoch is not over, so
        ``on_epoch_end`` does not fire and the position stays ``(epoch, batch_idx)``; the
        checkpoint records it (a resume continues with the next batch). Validation still runs,
        after the checkpoint (its random draws do not reach a resumed run), and the loss of the
        batches seen is logged as an epoch record marked ``partial``."""
        if self.run_dir is not None and not (self.checkpoint_every is not None
                                             and self.step % self.checkpoint_every == 0):
            self._save_guarded()
        self._validate_and_log_epoch(progress, partial=True)

    def _epoch_line_due(self, partial: bool) -> bool:
        """Plain output prints about 20 epoch lines per run (the first, the last, a stop, and
        evenly between); metrics.jsonl has every epoch."""
        if partial or self.max_epochs is None:
            return True
        every = math.ceil(self.max_epochs / 20)
        return self.epoch == 0 or (self.epoch + 1) % every == 0 or self.epoch + 1 == self.max_epochs

    def _validate_and_log_epoch(self, progress: _Progress, *, partial: bool) -> None:
        """Validate (``on_validation_end``) and log the epoch's mean loss and validation metrics."""
        record: dict[str, Any] = {"kind": "epoch", "epoch": self.epoch, "step": self.step}
        if partial:
            record["partial"] = True
        count = self._epoch_count + len(self._window)
        if count:
            total = self._epoch_sum + self._window_sum() if self._window else self._epoch_sum
            record["loss"] = total / count  # finite unless a loss is not
            if not math.isfinite(record["loss"]):
                self._guard()
        if self.val_loader is not None:
            self.val_metrics = self.evaluate(self.val_loader)
            record.update({f"val/{k}": v for k, v in self.val_metrics.items()})
            self.emit(Event.ON_VALIDATION_END)
        self._record(record)
        if progress.plain and progress.enabled and "loss" in record and self._epoch_line_due(partial):
            val = "".join(f" {k} {v:.4f}" for k, v in record.items() if k.startswith("val/"))
            where = f"stopped after batch {self.batch_idx}" if partial else "done"
            print(f"epoch {self.epoch} {where}: loss {record['loss']:.4f}{val}", flush=True)

    # logging -----------------------------------------------------------------------------
    def _start_logging(self, *, resumed: bool) -> None:
        if not (self.is_main and self.run_dir is not None):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resumed and path.exists():  # drop what the interrupted run logged after its checkpoint
            kept = []
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("partial"):  # a stop that this run continues past
                    continue
                if rec.get("step", 0) < self.step or (
                        rec.get("step") == self.step and rec.get("kind") == "train"
                        or rec.get("kind") == "epoch" and rec.get("epoch", 0) < self.epoch):
                    kept.append(line)
            path.write_text("".join(f"{line}\n" for line in kept))
            self.history = [json.loads(line) for line in kept]
        elif not resumed:
            path.write_text("")
            self.history = []

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.state.record = record
        self.emit(Event.ON_LOG)

    def _window_values(self) -> Tensor:
        """The log window's losses [n] (float64 on the CPU, float32 on the device)."""
        losses = list(map(_LOSS, self._window))
        if self._host_window:
            return torch.tensor(losses, dtype=torch.float64)
        return torch.stack(losses).float()  # promotes mixed dtypes

    def _window_sum(self) -> float:
        """The sum of the log window's losses, on the host (an accelerator's one sync of a
        log point)."""
        if self._host_window:
            return sum(map(_LOSS, self._window))
        return float(self._window_values().sum())

    def _log_train(self, progress: _Progress) -> None:
        count = len(self._window)
        if count == 0:
            return
        window = self._window_sum()
        loss = window / count
        if not math.isfinite(loss):
            self._guard()
        self._epoch_sum += window
        self._epoch_count += count
        samples = sum(map(_SAMPLES, self._window))
        self._window = []
        now = time.perf_counter()
        rate = samples * self.world / max(now - self._t_log, 1e-9)
        self._t_log = now
        logs = {k: float(v) for k, v in self.loss.logs.items()} if self.loss is not None else {}
        self.logs = {"loss": loss, **logs}
        record = {"kind": "train", "epoch": self.epoch, "step": self.step, "loss": loss,
                  "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate, **logs}
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        if self._skip_nonfinite:
            record["skipped_steps"] = self.skipped_steps
        self._record(record)
        eta = None
        if self.total_steps:
            elapsed = now - self._t_start
            done = max(self.step - self._start_step, 1)
            eta = elapsed / done * (self.total_steps - self.step)
        progress.log(epoch=self.epoch, step=self.step, loss=loss, rate=rate, eta=eta)

    def _write_summary(self) -> None:
        train = [r for r in self.history if r.get("kind") == "train"]
        epochs = [r for r in self.history if r.get("kind") == "epoch" and "loss" in r]
        summary: dict[str, Any] = {"steps": self.step, "epochs": self.epoch,
                                   "wall_time_s": time.perf_counter() - self._t_start}
        if epochs:
            summary["final_loss"] = epochs[-1]["loss"]
        if train:
            summary["samples_per_s"] = train[-1]["samples_per_s"]
        if self._skip_nonfinite:
            summary["skipped_steps"] = self.skipped_steps
        summary.update({f"val/{k}": v for k, v in self.val_metrics.items()})
        self.summary = summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            from sdk import plots

            plots.training_curves(self.history, self.run_dir / "training_curves.png")
        except ImportError:
            pass

    # checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        """``run_dir/checkpoints``: ``step-000123.pt`` files, the newest ``keep_checkpoints``."""
        return self.run_dir / "checkpoints" if self.run_dir else None

    @property
    def checkpoint_path(self) -> Path | None:
        """The newest checkpoint file of the run directory (``None`` when there is none)."""
        files = ckpt.checkpoint_files(self.checkpoint_dir) if self.run_dir else []
        return files[0] if files else None

    def _resume_path(self, resume: bool | str | os.PathLike) -> Path | None:
        if resume is False or resume is None:
            return None
        if resume is True:
            found = self.run_dir is not None and ckpt.checkpoint_files(self.checkpoint_dir)
            return self.checkpoint_dir if found else None
        path = Path(resume)
        if path.is_dir():
            path = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            if not ckpt.checkpoint_files(path):
                raise FileNotFoundError(f"no checkpoint in {path}")
        elif not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return path

    def _stateful(self) -> dict[str, Any]:
        named: dict[str, Any] = {"encoder": self.encoder, "objective": self.objective,
                                 "teacher": self.teacher, "sampler": self.pair_sampler,
                                 "reweighter": self.reweighter, "data_sampler": self.data_sampler}
        for i, t in enumerate(self.view_transforms):
            named[f"transforms.{i}"] = t
        for i, t in enumerate(self.unlabeled_transforms):
            named[f"unlabeled_transforms.{i}"] = t
        for i, cb in enumerate(self.callbacks):
            named[f"callbacks.{i}"] = cb
        return {k: v for k, v in named.items() if isinstance(v, _STATEFUL)}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (this rank's view; RNG states of every rank)."""
        return {
            "format": 1,
            "position": {"epoch": self.epoch, "batch": self.batch_idx, "step": self.step,
                         **({"unlabeled": list(self._unlabeled.position)}
                            if self._unlabeled is not None else {})},
            "running": self._running(),
            "components": {k: v.state_dict() for k, v in self._stateful().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": distributed.all_gather_object(ckpt.rng_state()),
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Atomically write :meth:`state_dict` (rank 0 writes; every rank must call it) to
        ``path``, or to ``checkpoint_dir/step-<step>.pt``, keeping the ``keep_checkpoints``
        newest there."""
        state = self.state_dict()
        if not self.is_main or path is None and self.run_dir is None:
            return None
        if path is not None:
            return ckpt.save(state, path)
        written = ckpt.save(state, self.checkpoint_dir / ckpt.checkpoint_name(self.step))
        ckpt.prune(self.checkpoint_dir, keep=self.keep_checkpoints, latest=written)
        return written

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint file, or the newest valid one of a checkpoints directory (older
        ones after a :class:`~sdk.errors.CheckpointWarning` for each invalid newer one); returns
        the number of batches to skip in the current epoch. A checkpoint that does not fit this
        trainer's components raises a :class:`~sdk.errors.CheckpointError` naming the keys,
        before anything is loaded."""
        path = Path(path)
        path, state = ckpt.load_newest(path) if path.is_dir() else (path, ckpt.load(path))
        self._check_fits(path, state)
        for name, comp in self._stateful().items():
            if name in state["components"]:
                comp.load_state_dict(state["components"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        pos = state["position"]
        self.epoch, self.batch_idx, self.step = pos["epoch"], pos["batch"], pos["step"]
        if self._unlabeled is not None:
            self._unlabeled.seek(*pos.get("unlabeled", (0, 0)))
        run = state["running"]
        self._epoch_sum = float(run["epoch_sum"])
        # the window's losses were checked before it was written; their samples were counted
        window = run["window"]
        losses = window.tolist() if self._host_window else window.to(self.device).unbind()
        self._window = [(v, self.step, {}, 0) for v in losses]
        self._epoch_count = run["epoch_count"] - len(self._window)
        self.skipped_steps = run.get("skipped_steps", 0)
        self._last_good = path
        return self.batch_idx

    def _check_fits(self, path: Path, state: dict[str, Any]) -> None:
        """CheckpointError listing, per component, what keeps ``state`` from loading."""
        saved, own = state["components"], self._stateful()
        problems = [f"{name}: {why}" for name, comp in own.items() if name in saved
                    and isinstance(comp, nn.Module) and (why := ckpt.mismatch(comp, saved[name]))]
        held = {name for name, value in saved.items() if value}  # stateless parts may come and go
        holds = {name for name, comp in own.items() if comp.state_dict()}
        if held - set(own):
            problems.append(f"components in the checkpoint but not in this trainer: "
                            f"{', '.join(sorted(held - set(own)))}")
        if holds - set(saved):
            problems.append(f"components of this trainer missing from the checkpoint: "
                            f"{', '.join(sorted(holds - set(saved)))}")
        groups = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        if not problems and groups != [len(g["params"]) for g in self.optimizer.param_groups]:
            problems.append(f"optimizer: the checkpoint's parameter groups hold {groups} "
                            f"parameters, this trainer's "
                            f"{[len(g['params']) for g in self.optimizer.param_groups]}")
        if problems:
            raise CheckpointError(f"checkpoint {path} does not match this trainer (did the "
                                  f"model or plugins change?): " + "; ".join(problems))

    def _running(self) -> dict[str, Any]:
        """The losses of the current log window and the epoch's sum of the logged ones (so a
        resumed run logs the same, bit for bit)."""
        window = self._window_values() if self._window else torch.zeros(0)
        return {"epoch_sum": torch.tensor(self._epoch_sum, dtype=torch.float64),
                "window": window.cpu(),
                "log_count": len(self._window),
                "epoch_count": self._epoch_count + len(self._window),
                "skipped_steps": self.skipped_steps}

    # inference ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modules = [m for m in self.components if isinstance(m, nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad(), self._autocast_or_null():
                yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def _autocast_or_null(self) -> Any:
        return self._autocast() if self._setup_done else contextlib.nullcontext()

    def _prepare_inference(self) -> None:
        if not self._setup_done:
            for comp in self.components:
                if isinstance(comp, nn.Module):
                    comp.to(self.device)
            self._plan()
            self._encode = self._encode_impl
            self._encode_z = self.encoder

    def embed(self, loader: Any, *, features: bool = False,
              with_targets: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """No-grad encoder outputs (``features=True``: backbone features) of a whole dataset,
        one row per item in dataset order (a training loader's shuffling and ``drop_last`` are
        ignored), float32 on the device. ``with_targets=True`` also returns the targets."""
        self._prepare_inference()
        if features and not isinstance(self.encoder, Encoder):
            raise RequirementError(f"embed(features=True): the encoder ({type(self.encoder).__name__})"
                                   " is not an sdk Encoder with features(x)")
        fn = self.encoder.features if features else self.encoder
        outs, targets = [], []
        with self._eval_mode():
            for item in self._ordered(loader):
                x, batch = self._to_device(item)
                outs.append(fn(x).float())
                if with_targets:
                    targets.append(batch.targets)
        emb = torch.cat(outs)
        if with_targets:
            return emb, torch.cat(targets)
        return emb

    def predict(self, loader: Any) -> Tensor:
        """Class scores (the encoder's outputs) of every item, in dataset order."""
        return self.embed(loader)

    def evaluate(self, loader: Any) -> dict[str, float]:
        """Mean objective loss over ``loader``, modules in eval mode, with the objective's inputs
        built as in training (views, features, the teacher's outputs and its ``memory()``), but
        no events run (listeners that change the batch, views or loss in training do not act
        here); with logits also ``accuracy``, ``nll`` and ``ece`` of the encoder's outputs on
        the un-augmented inputs (what :meth:`predict` returns)."""
        self._prepare_inference()
        total = torch.zeros((), device=self.device)
        count = 0
        logits, targets = [], []
        state = self.state
        saved = (state.x, state.batch, state.views, state.loss)
        with self._eval_mode():
            for item in self._ordered(loader):
                x, batch = self._to_device(item)
                value = self._compute(x, batch, events=False)
                total += value.float() * x.shape[0]
                count += x.shape[0]
                if self._needs_logits and batch.targets is not None:
                    logits.append(self._encode(x)[0].float())
                    targets.append(batch.targets)
        state.x, state.batch, state.views, state.loss = saved
        out = {"loss": float(total) / max(count, 1)}
        if logits:
            from sdk import metrics

            z, y = torch.cat(logits), torch.cat(targets)
            if y.dim() == 1 and z.dim() == 2:  # class scores (not a sequence's [N, T, V])
                probs = z.softmax(-1)
                out.update(accuracy=metrics.accuracy(probs, y), nll=metrics.nll(probs, y),
                           ece=metrics.ece(probs, y))
        return out
