"""The plugin interfaces. Each is small; stateful ones are ``torch.nn.Module`` subclasses.

Five core kinds (Encoder, Objective, Sampler, Calibrator, Reweighter) and the extra kinds
the seed methods need (Teacher, Schedule, Metric, Transform, Callback). Every one checks the
parameter constraints declared in a subclass's ``__init__`` signature when it is instantiated
(:class:`sdk.constraints.Constrained`).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdk.constraints import Constrained
from sdk.errors import RequirementError, ShapeError
from sdk.types import Batch, Loss, Pairs, Views

_REQUIREMENT_KEYS = {"views", "targets", "logits", "index", "domain", "weight", "extras"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Encoder(nn.Module, Constrained, abc.ABC):
    """Maps inputs to embeddings: ``forward(x) -> Tensor[B, out_dim]``."""

    out_dim: int

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor: ...


class Objective(nn.Module, Constrained, abc.ABC):
    """A loss: ``obj(views, batch) -> Loss``.

    Subclasses declare ``requires`` (keys: ``views`` (count), ``targets``, ``logits``,
    ``index``, ``domain``, ``weight``: bool; ``extras``: tuple of keys). Calling an objective
    checks them before any math, so a recipe that cannot feed it fails with a clear message.
    Objectives compose: ``0.5 * a + b`` is a :class:`sdk.compose.WeightedSum`.
    """

    requires: ClassVar[Mapping[str, Any]] = {}

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


class Sampler(nn.Module, Constrained, abc.ABC):
    """Chooses which pairs count: ``pairs(views, batch) -> Pairs``.

    Rows and columns index ``torch.cat(views.embeddings)`` (view-major: row ``v*B + i`` is
    view ``v`` of sample ``i``). Data-level samplers (what enters a batch) subclass
    ``torch.utils.data.Sampler`` instead and are registered under the same kind.
    """

    @abc.abstractmethod
    def pairs(self, views: Views, batch: Batch) -> Pairs: ...

    def forward(self, views: Views, batch: Batch) -> Pairs:
        return self.pairs(views, batch)


class Reweighter(nn.Module, Constrained, abc.ABC):
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


class Calibrator(nn.Module, Constrained, abc.ABC):
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


class Teacher(nn.Module, Constrained, abc.ABC):
    """Target networks, memory banks and queues, updated by the engine after each step.

    ``update`` receives keyword context; each teacher uses what it needs. With gradient
    accumulation an optimizer step spans several micro-batches: the engine calls ``observe``
    after every micro-batch's backward, then ``update`` once per optimizer step. A teacher that
    records data (queue keys, memory entries) overrides ``observe``; the engine then calls its
    ``update`` with ``views=None, batch=None`` (they were observed), and ``update`` called
    directly with views observes them first. A teacher that does not override ``observe``
    receives the last micro-batch's views and batch in ``update``.
    """

    @abc.abstractmethod
    def update(self, *, student: nn.Module | None = None, views: Views | None = None,
               batch: Batch | None = None, step: int = 0, max_steps: int | None = None) -> None: ...

    def observe(self, *, views: Views, batch: Batch, step: int = 0,
                max_steps: int | None = None) -> None:
        """Told after every micro-batch's backward; data-recording teachers override it."""


class Transform(nn.Module, Constrained, abc.ABC):
    """Tensor-level view generation or input transformation: ``forward(x, batch) -> (x, batch)``."""

    @abc.abstractmethod
    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]: ...


class Schedule(Constrained, abc.ABC):
    """A value as a function of progress: ``schedule(step, max_steps) -> float``."""

    @abc.abstractmethod
    def __call__(self, step: int, max_steps: int | None = None) -> float: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless schedules have nothing to restore."""


class Metric(Constrained, abc.ABC):
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


class Callback(Constrained):
    """Reacts to engine events; override any subset. Each event receives the trainer."""

    def on_fit_start(self, trainer: Any) -> None: ...
    def on_epoch_start(self, trainer: Any) -> None: ...
    def after_forward(self, trainer: Any) -> None: ...
    def after_loss(self, trainer: Any) -> None: ...
    def before_backward(self, trainer: Any) -> None: ...
    def before_optimizer_step(self, trainer: Any) -> None: ...
    def after_optimizer_step(self, trainer: Any) -> None: ...
    def on_epoch_end(self, trainer: Any) -> None: ...
    def on_validation_end(self, trainer: Any) -> None: ...
    def on_fit_end(self, trainer: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless callbacks have nothing to restore."""


EVENTS = tuple(name for name in vars(Callback) if name.startswith(("on_", "after_", "before_")))

INTERFACES: dict[str, type] = {
    "encoder": Encoder, "objective": Objective, "sampler": Sampler, "calibrator": Calibrator,
    "reweighter": Reweighter, "teacher": Teacher, "schedule": Schedule, "metric": Metric,
    "transform": Transform, "callback": Callback,
}
