"""The plugin interfaces. Each is small; stateful ones are ``torch.nn.Module`` subclasses.

Five core kinds (Encoder, Objective, Sampler, Calibrator, Reweighter) and the extra kinds
the seed methods need (Teacher, Schedule, Metric, Transform, Callback, DataSampler). Every
capability the engine uses is a method or attribute declared here, with a default that does
nothing, so the engine never probes an object for what it can do.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdk.errors import RequirementError, ShapeError
from sdk.events import EVENTS as EVENTS  # re-exported: the events' method names
from sdk.events import Event, State
from sdk.types import Batch, Loss, Pairs, Views

_REQUIREMENT_KEYS = {"views", "targets", "logits", "index", "domain", "weight", "extras"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Encoder(nn.Module, abc.ABC):
    """Maps inputs to embeddings: ``forward(x) -> Tensor[B, out_dim]``.

    An encoder made of a backbone and a projection head (``forward(x) == head(features(x))``)
    overrides :meth:`features` and holds the head as a submodule named ``head``: the engine
    then runs the backbone once per view, applies ``head`` to its output and publishes the
    features as ``Views.extras[keys.FEATURES]``.
    """

    out_dim: int

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor: ...

    def features(self, x: Tensor) -> Tensor:
        """The representation before the projection head, ``[B, F]``; an encoder without a head:
        its output."""
        return self(x)

    @property
    def head(self) -> nn.Module | None:
        """The projection head (the submodule named ``head``) when ``forward(x) ==
        head(features(x))``, else ``None``."""
        return self._modules.get("head")


class Objective(nn.Module, abc.ABC):
    """A loss: ``obj(views, batch) -> Loss``.

    Subclasses declare ``requires`` (keys: ``views`` (count), ``targets``, ``logits``,
    ``index``, ``domain``, ``weight``: bool; ``extras``: tuple of keys). Calling an objective
    checks them before any math, so a recipe that cannot feed it fails with a clear message.
    Objectives compose: ``0.5 * a + b`` is a :class:`sdk.compose.WeightedSum`.
    """

    requires: ClassVar[Mapping[str, Any]] = {}
    accepts_sampler: ClassVar[bool] = False
    """Whether the objective has a pair-sampler slot (:attr:`sampler`): a Trainer given a pair
    Sampler fills every empty slot of the objective's terms."""

    @property
    def sampler(self) -> Sampler | None:
        """The pair Sampler choosing which pairs count (``None``: the objective's default);
        meaningful only when :attr:`accepts_sampler`."""
        return self._modules.get("sampler")

    @sampler.setter
    def sampler(self, value: Sampler | None) -> None:  # a Sampler module goes to _modules directly
        if value is not None:
            raise TypeError(f"objective {self.name!r}: sampler must be an sdk Sampler or None, "
                            f"got {type(value).__name__}")
        self._modules["sampler"] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.requires, Mapping):  # computed per instance (e.g. WeightedSum)
            return
        unknown = set(cls.requires) - _REQUIREMENT_KEYS
        if unknown:
            raise TypeError(f"{cls.__name__}.requires: unknown keys {sorted(unknown)}; "
                            f"allowed: {sorted(_REQUIREMENT_KEYS)}")

    @property
    def name(self) -> str:
        return getattr(self, "_plugin_name", None) or _snake(type(self).__name__)

    @name.setter
    def name(self, value: str) -> None:
        self._plugin_name = value

    def check_requirements(self, views: Views, batch: Batch) -> None:
        req = self.requires
        need = int(req.get("views", 0))
        if views.n_views < need:
            raise RequirementError(f"objective {self.name!r} needs at least {need} views, "
                                   f"got {views.n_views}")
        if req.get("logits") and views.logits is None:
            raise RequirementError(f"objective {self.name!r} needs Views.logits [B, C], got None")
        for field in ("targets", "index", "domain", "weight"):
            if req.get(field) and getattr(batch, field) is None:
                raise RequirementError(f"objective {self.name!r} needs Batch.{field}, got None")
        for key in req.get("extras", ()):
            if key not in views.extras and key not in batch.extras:
                raise RequirementError(f"objective {self.name!r} needs extras[{key!r}] in Views or Batch")
        bs = batch.batch_size
        if bs is not None and views.batch_size != bs:
            raise ShapeError(f"objective {self.name!r}: Views batch size {views.batch_size} "
                             f"does not match Batch batch size {bs}")

    def __call__(self, views: Views, batch: Batch | None = None) -> Loss:
        if not isinstance(views, Views):
            raise TypeError(f"objective {self.name!r}: expected sdk.Views as first argument, "
                            f"got {type(views).__name__}")
        batch = Batch() if batch is None else batch
        if not isinstance(batch, Batch):
            raise TypeError(f"objective {self.name!r}: expected sdk.Batch as second argument, "
                            f"got {type(batch).__name__}")
        self.check_requirements(views, batch)
        loss = super().__call__(views, batch)
        if not isinstance(loss, Loss):
            raise TypeError(f"objective {self.name!r} returned {type(loss).__name__}, expected sdk.Loss")
        return loss

    @abc.abstractmethod
    def forward(self, views: Views, batch: Batch) -> Loss: ...

    def set_progress(self, step: int, max_steps: int | None) -> None:
        """Told by the engine before each step; objectives with schedules override it."""

    # objective algebra -------------------------------------------------------
    def __mul__(self, weight: Any) -> Objective:
        from sdk.compose import WeightedSum

        return WeightedSum.of(self, weight)

    __rmul__ = __mul__

    def __add__(self, other: Any) -> Objective:
        from sdk.compose import WeightedSum

        if not isinstance(other, Objective):
            return NotImplemented
        return WeightedSum.of(self) + other

    def __radd__(self, other: Any) -> Objective:
        if other == 0:  # sum([a, b, c]) starts from 0
            return self
        return NotImplemented


class Sampler(nn.Module, abc.ABC):
    """Chooses which pairs count: ``pairs(views, batch) -> Pairs``.

    Rows and columns index ``torch.cat(views.embeddings)`` (view-major: row ``v*B + i`` is
    view ``v`` of sample ``i``). Data-level samplers (what enters a batch) subclass
    :class:`DataSampler` instead and are registered under the same kind.
    """

    @abc.abstractmethod
    def pairs(self, views: Views, batch: Batch) -> Pairs: ...

    def forward(self, views: Views, batch: Batch) -> Pairs:
        return self.pairs(views, batch)


class Reweighter(nn.Module, abc.ABC):
    """Weights per-sample losses: ``weights(per_sample, batch) -> Tensor[B]``.

    :meth:`reduce` applies them as ``sum(w * l) / sum(w)``.
    """

    @abc.abstractmethod
    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor: ...

    def reduce(self, loss: Loss, batch: Batch) -> Loss:
        if loss.per_sample is None:
            raise RequirementError(f"reweighter {type(self).__name__} needs Loss.per_sample, "
                                   "but the objective returned none")
        w = self.weights(loss.per_sample, batch)
        if w.shape != loss.per_sample.shape:
            raise ShapeError(f"reweighter {type(self).__name__}: weights {list(w.shape)} do not "
                             f"match per_sample {list(loss.per_sample.shape)}")
        value = (w * loss.per_sample).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
        logs = dict(loss.logs)
        logs["unweighted"] = loss.value.detach()
        return Loss(value=value, per_sample=loss.per_sample, logs=logs)


class Calibrator(nn.Module, abc.ABC):
    """Post-hoc calibration: ``fit(logits, labels, **extra) -> self``; ``forward(logits) -> logits``."""

    @abc.abstractmethod
    def fit(self, logits: Tensor, labels: Tensor, **extra: Any) -> Calibrator: ...

    @abc.abstractmethod
    def forward(self, logits: Tensor) -> Tensor: ...

    def predict(self, logits: Tensor) -> Tensor:
        """Class decisions; decision-rule calibrators override this."""
        return self(logits).argmax(dim=-1)

    def predict_proba(self, logits: Tensor) -> Tensor:
        return self(logits).softmax(dim=-1)


class Teacher(nn.Module, abc.ABC):
    """Target networks, memory banks and queues, updated by the engine after each step.

    What the engine does with a teacher, each through a declared member:

    * :meth:`attach` once, when the first ``fit`` starts (a target network copies the student);
    * when :attr:`encodes_views`, ``teacher(x_v)`` per view becomes
      ``Views.extras[keys.TEACHER]`` (a tuple, one entry per view);
    * :meth:`memory` is merged into ``Views.extras`` before every objective call, in training
      and in ``Trainer.evaluate`` alike (queues and memory banks publish negatives this way);
    * ``observe`` after every micro-batch's backward, then ``update`` once per optimizer step.

    ``update`` receives keyword context; each teacher uses what it needs. A teacher that
    records data (queue keys, memory entries) overrides ``observe`` (:attr:`observes` is then
    true); the engine then calls its ``update`` with ``views=None, batch=None`` (they were
    observed), and ``update`` called directly with views observes them first. A teacher that
    does not override ``observe`` receives the last micro-batch's views and batch in ``update``.
    """

    memory_keys: ClassVar[tuple[str, ...]] = ()
    """The ``Views.extras`` keys :meth:`memory` publishes (see :mod:`sdk.keys`)."""

    @property
    def encodes_views(self) -> bool:
        """Whether ``forward(x)`` is a network the engine runs on every view: by default, whether
        the class defines ``forward``; a class may set ``encodes_views = False``."""
        return type(self).forward is not nn.Module.forward

    @property
    def observes(self) -> bool:
        """Whether :meth:`observe` records data: by default, whether the class overrides it."""
        return type(self).observe is not Teacher.observe

    def attach(self, student: nn.Module) -> Any:
        """Told the encoder being trained when the first ``fit`` starts; target networks copy it."""
        return self

    def memory(self) -> Mapping[str, Tensor]:
        """Entries merged into ``Views.extras`` before the objective runs, in training and in
        validation (e.g. ``keys.NEGATIVES``); none by default."""
        return _NO_MEMORY

    @abc.abstractmethod
    def update(self, *, student: nn.Module | None = None, views: Views | None = None,
               batch: Batch | None = None, step: int = 0, max_steps: int | None = None) -> None: ...

    def observe(self, *, views: Views, batch: Batch, step: int = 0,
                max_steps: int | None = None) -> None:
        """Told after every micro-batch's backward; data-recording teachers override it."""


class DataSampler(torch.utils.data.Sampler):
    """A data-level sampler (which items enter a batch, in which order) the Trainer drives.

    The Trainer calls :meth:`bind` with the training set before the first epoch and
    :meth:`set_epoch` before every epoch's batches are drawn; under DDP it gives each rank every
    ``world``-th index of the order unless :attr:`shards_ranks`. Plain ``torch.utils.data``
    samplers work too (``DistributedSampler``'s ``set_epoch`` is called).
    """

    shards_ranks: ClassVar[bool] = False
    """True when the sampler splits its order over the ranks itself (the Trainer then uses it
    as it is)."""

    def bind(self, dataset: Any) -> None:
        """Told the training set before the first epoch (e.g. to learn its size)."""

    def set_epoch(self, epoch: int) -> None:
        """Told the epoch about to start (seeded per-epoch orders)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless samplers have nothing to restore."""


class Transform(nn.Module, abc.ABC):
    """Tensor-level view generation or input transformation: ``forward(x, batch) -> (x, batch)``."""

    @abc.abstractmethod
    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]: ...


class Schedule(abc.ABC):
    """A value as a function of progress: ``schedule(step, max_steps) -> float``."""

    @abc.abstractmethod
    def __call__(self, step: int, max_steps: int | None = None) -> float: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless schedules have nothing to restore."""


class Metric(abc.ABC):
    """A measurement, streaming (``update`` / ``compute`` / ``reset``)."""

    @abc.abstractmethod
    def update(self, *args: Tensor, **kwargs: Tensor) -> None: ...

    @abc.abstractmethod
    def compute(self) -> float | dict[str, float]: ...

    @abc.abstractmethod
    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Metrics without persistent state have nothing to restore."""


class Callback:
    """Reacts to engine events: override any subset of the methods named after the
    :class:`sdk.events.Event` members; each receives the run's :class:`sdk.events.State`."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless callbacks have nothing to restore."""


def _listener(event: Event) -> Any:
    def listener(self: Any, state: State) -> None:
        pass

    listener.__name__ = event.value
    listener.__qualname__ = f"Callback.{event.value}"
    listener.__doc__ = event.doc
    return listener


for _event in Event:  # the Callback base is derived from the one list of events
    setattr(Callback, _event.value, _listener(_event))
del _event

_NO_MEMORY: Mapping[str, Tensor] = MappingProxyType({})

INTERFACES: dict[str, type] = {
    "encoder": Encoder, "objective": Objective, "sampler": Sampler, "calibrator": Calibrator,
    "reweighter": Reweighter, "teacher": Teacher, "schedule": Schedule, "metric": Metric,
    "transform": Transform, "callback": Callback,
}
