"""The plugin interfaces. Each is small; stateful ones are ``torch.nn.Module`` subclasses.

Five core kinds (Encoder, Objective, Sampler, Calibrator, Reweighter) and the extra kinds
the seed methods need (Teacher, Schedule, Metric, Transform, Callback, Detector, Adapter,
DataSampler). Every capability the engine uses is a method or attribute declared here, with a
default that does nothing, so the engine never probes an object for what it can do; every one
checks the parameter constraints declared in a subclass's ``__init__`` signature when it is
instantiated (:class:`sdk.constraints.Constrained`).
"""

from __future__ import annotations

import abc
import copy
import enum
import functools
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdk.constraints import Constrained
from sdk.errors import ConfigError, NotFittedError, RequirementError, ShapeError
from sdk.events import EVENTS as EVENTS  # re-exported: the events' method names
from sdk.events import Event, State
from sdk.types import Batch, Loss, Pairs, TypedScores, Views

_REQUIREMENT_KEYS = {"views", "targets", "logits", "index", "domain", "weight", "extras",
                     "unlabeled"}


class Input(str, enum.Enum):
    """What one plugin produces and another consumes: the vocabulary of composition checks.

    An Objective declares ``consumes``; a Sampler, Teacher or Transform declares ``produces``.
    :func:`sdk.compose.check_composition` rejects a composition in which something produced
    would be ignored.
    """

    PAIRS = "pairs"
    """positive / negative pair masks (``Pairs.positive``, ``Pairs.negative``)"""
    PAIR_WEIGHTS = "pair_weights"
    """per-pair weights (``Pairs.weight``)"""
    EXTRA_NEGATIVES = "extra_negatives"
    """negatives beyond the batch: a Sampler's synthetic ones (``Pairs.extra_negatives`` /
    ``extra_negative_sims``) or a queue / memory bank's ``Views.extras["negatives"]``"""
    LABELS = "labels"
    """class ids in ``Batch.targets``"""
    SOFT_LABELS = "soft_labels"
    """probability targets ``[B, C]`` in ``Batch.targets`` (e.g. mixed by mixup)"""
    LOGITS = "logits"
    """class scores ``Views.logits``"""
    FEATURES = "features"
    """backbone features ``Views.extras["features"]``"""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


SCORE_KINDS = ("logits", "probabilities")
"""Class scores a calibrator or detector takes (its ``inputs``); a detector may also take
``"features"``."""

CALIBRATOR_INPUTS = (*SCORE_KINDS, "features", "regression", "similarities")
"""What a calibrator may declare as its ``inputs`` (see :class:`Calibrator`)."""

FIT_EXTRAS = {"domains": "domain ids [N] (non-negative integers)"}
"""The keyword arguments a calibrator may declare in ``fit_requires``, with their form."""


def _scores(plugin: str, declared: str, x: Any, argument: str) -> Tensor:
    """``x`` as a plain tensor, once a typed ``x`` (:class:`sdk.Logits`, :class:`sdk.Probabilities`)
    is checked to be the ``declared`` kind; a plain tensor is taken to be that kind."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{plugin}: {argument} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(x, TypedScores):
        if x.kind != declared:
            raise TypeError(f"{plugin} takes {declared} (inputs = {declared!r}), but {argument} "
                            f"is sdk.{type(x).__name__}")
        return x.as_subclass(Tensor)
    return x


class _Named:
    """``name``: the class name in snake case unless set (a registry name)."""

    @property
    def name(self) -> str:
        return getattr(self, "_plugin_name", None) or _snake(type(self).__name__)

    @name.setter
    def name(self, value: str) -> None:
        self._plugin_name = value


class Encoder(nn.Module, Constrained, abc.ABC):
    """Maps inputs to embeddings: ``forward(x) -> Tensor[B, out_dim]``.

    An encoder made of a backbone and a projection head (``forward(x) == head(features(x))``)
    overrides :meth:`features` and holds the head as a submodule named ``head``: the engine
    then runs the backbone once per view, applies ``head`` to its output and publishes the
    features as ``Views.extras[keys.FEATURES]``.
    """

    out_dim: int
    takes_ids: ClassVar[bool] = False
    """Whether ``forward`` takes integer ids (categorical fields, tokens) instead of floating
    features: the conformance kit then feeds its ``example_inputs`` as they are and expects a
    floating input to be refused."""
    sequence: ClassVar[bool] = False
    """Whether the encoder is a sequence model: ``forward`` takes token ids, long ``[B, T]`` in
    ``[0, out_dim)``, and returns next-token scores ``[B, T, out_dim]`` (:mod:`sdk.sequence`),
    which the Trainer passes to objectives as ``Views.logits``; the conformance kit feeds it
    token ids."""

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


class Objective(_Named, nn.Module, Constrained, abc.ABC):
    """A loss: ``obj(views, batch) -> Loss``.

    Subclasses declare ``requires`` (keys: ``views`` (count), ``targets``, ``logits``,
    ``index``, ``domain``, ``weight``: bool; ``extras``: tuple of keys; ``unlabeled``: bool,
    training needs the Trainer's unlabelled loader, whose outputs arrive as
    ``Views.extras[keys.UNLABELED]``; calls without them, as in evaluation, are valid and compute
    the labelled part). Calling an objective
    checks them before any math, so a recipe that cannot feed it fails with a clear message,
    and checks the metadata of what it got (floating embeddings and logits, a non-empty batch,
    Batch fields of the Views' batch size), raising :class:`sdk.ShapeError` naming the
    objective and the field. Values are not checked (that would cost a host sync per call):
    NaN or inf in the inputs must come out as a non-finite loss, which the engine's guard sees.
    Objectives compose: ``0.5 * a + b`` is a :class:`sdk.compose.WeightedSum`.

    ``consumes``: the :class:`Input` s the loss uses when a Sampler, Teacher or Transform
    provides them (anything else they produce would be ignored, so the composition is
    rejected). ``batch_coupled``: whether the loss of a sample depends on the other samples of
    the batch (then it takes ``gather``, "auto" by default: on under DDP, and the conformance
    kit checks that two ranks equal one process on the concatenated batch); None = undeclared,
    which the conformance kit rejects.
    """

    requires: ClassVar[Mapping[str, Any]] = {}
    consumes: ClassVar[frozenset[Input]] = frozenset()
    batch_coupled: ClassVar[bool | None] = None
    accepts_unknown: ClassVar[bool] = False
    """Whether ``Batch.targets`` class ids may hold :data:`sdk.classification.UNKNOWN` (``-1``)
    for rows whose class is unknown: unlabelled rows of semi-supervised and open-set objectives,
    outliers of an unknown class. The conformance kit fuzzes such rows only for objectives that
    declare it; every other objective refuses ``-1`` as an id out of range
    (:func:`sdk.classification.targets` says which objectives take it)."""
    accepts_sampler: ClassVar[bool] = False
    """Whether the objective has a pair-sampler slot (:attr:`sampler`): a Trainer given a pair
    Sampler fills every empty slot of the objective's terms."""
    per_sample_requested: bool = True
    """Whether the caller reads ``Loss.per_sample``. The Trainer sets it (through
    :meth:`request_per_sample`) to whether anything in the run does: a reweighter, or a callback
    declaring ``reads_per_sample_loss``. When it is false an objective may leave ``per_sample``
    ``None`` and compute only the mean (cross-entropy then takes torch's fused reduction)."""

    def request_per_sample(self, wanted: bool) -> None:
        """Set :attr:`per_sample_requested` (a composition sets it on its terms too)."""
        self.per_sample_requested = wanted

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
        for i, z in enumerate(views.embeddings):
            if not z.is_floating_point():
                raise ShapeError(f"objective {self.name!r}: Views.embeddings[{i}] must be floating "
                                 f"point, got {z.dtype}")
        if views.logits is not None and not views.logits.is_floating_point():
            raise ShapeError(f"objective {self.name!r}: Views.logits must be floating point, got "
                             f"{views.logits.dtype}")
        if (views.embeddings or views.logits is not None) and views.batch_size == 0:
            raise ShapeError(f"objective {self.name!r}: empty batch (Views hold 0 samples)")
        bs = batch.batch_size
        if bs is not None and views.batch_size != bs:
            field = next(f for f in ("targets", "index", "domain", "weight") if getattr(batch, f) is not None)
            raise ShapeError(f"objective {self.name!r}: Batch.{field} has {bs} rows, but Views hold "
                             f"{views.batch_size} samples")

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

    def caveats(self) -> Mapping[Input, str]:
        """Inputs this objective, as configured, uses with a legal but surprising effect (and
        why); composing it with their producer warns once."""
        return {}

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


class Sampler(_Named, nn.Module, Constrained, abc.ABC):
    """Chooses which pairs count: ``pairs(views, batch) -> Pairs``.

    Rows and columns index ``torch.cat(views.embeddings)`` (view-major: row ``v*B + i`` is
    view ``v`` of sample ``i``). Data-level samplers (what enters a batch) subclass
    :class:`DataSampler` instead and are registered under the same kind.
    ``produces``: the :class:`Input` s its ``Pairs`` carry (the objective must consume them all).
    ``pairs`` first checks (metadata only) that the views are floating, not empty, and of the
    batch's size, raising :class:`sdk.ShapeError` naming the sampler.
    """

    produces: ClassVar[frozenset[Input]] = frozenset({Input.PAIRS})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        impl = vars(cls).get("pairs")
        if impl is not None and not getattr(impl, "__isabstractmethod__", False):
            @functools.wraps(impl)  # named as the method, so a failure inside reads "pairs()"
            def pairs(self: Sampler, views: Views, batch: Batch) -> Pairs:
                self._check(views, batch)
                return impl(self, views, batch)

            cls.pairs = pairs

    def _check(self, views: Views, batch: Batch) -> None:
        owner = f"sampler {self.name!r}"
        if not views.embeddings:
            raise RequirementError(f"{owner} needs Views.embeddings, got none")
        for i, z in enumerate(views.embeddings):
            if not z.is_floating_point():
                raise ShapeError(f"{owner}: Views.embeddings[{i}] must be floating point, got {z.dtype}")
        if views.batch_size == 0:
            raise ShapeError(f"{owner}: empty batch (Views hold 0 samples)")
        if batch.batch_size is not None and batch.batch_size != views.batch_size:
            field = next(f for f in ("targets", "index", "domain", "weight") if getattr(batch, f) is not None)
            raise ShapeError(f"{owner}: Batch.{field} has {batch.batch_size} rows, but Views hold "
                             f"{views.batch_size} samples")

    @abc.abstractmethod
    def pairs(self, views: Views, batch: Batch) -> Pairs: ...

    def forward(self, views: Views, batch: Batch) -> Pairs:
        return self.pairs(views, batch)


class Reweighter(nn.Module, Constrained, abc.ABC):
    """Weights per-sample losses: ``weights(per_sample, batch) -> Tensor[B]``.

    :meth:`reduce` applies them as ``sum(w * l) / sum(w)``. A reweighter whose weights carry
    the scale of the loss themselves (group DRO's ``q_g / n_g``, whose weighted sum is the
    objective) sets ``normalize = False``: it is reduced as ``sum(w * l)``.
    """

    normalize: ClassVar[bool] = True

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
        value = (w * loss.per_sample).sum()
        if self.normalize:
            value = value / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
        logs = dict(loss.logs)
        logs["unweighted"] = loss.value.detach()
        return Loss(value=value, per_sample=loss.per_sample, logs=logs)


class Calibrator(_Named, nn.Module, Constrained, abc.ABC):
    """Post-hoc calibration: ``fit(scores, labels, **extra) -> self``; ``calibrator(scores)``
    returns the calibrated output.

    ``inputs`` declares the scores ``fit`` and ``forward`` take, one floating tensor ``[N, W]``
    whose rows are samples, and what ``labels`` are:

    * ``"logits"`` / ``"probabilities"``: class scores ``[N, C]``; labels class ids in
      ``[0, C)``; the output is calibrated scores of the same kind and shape;
    * ``"features"``: representations ``[N, D]``; labels class ids in ``[0, num_classes)``
      (the calibrator's ``num_classes``); the output is logits ``[N, num_classes]``;
    * ``"regression"``: a regressor's point prediction in column 0 and ``D >= 0`` covariates
      in columns ``1..D`` ``[N, 1 + D]``; labels real targets ``[N]``; the output is the
      calibrator's per-row estimates (its card says which columns);
    * ``"similarities"``: a query-document similarity in column 0 and the query's embedding in
      columns ``1..D`` ``[N, 1 + D]``; labels binary relevance (0 or 1) ``[N]``; the output is
      calibrated relevance probabilities ``[N, 1]``.

    Scores wrapped as :class:`sdk.Logits` / :class:`sdk.Probabilities` are checked against
    ``inputs``, so probabilities given to a logit calibrator (or any typed scores given to a
    features calibrator) raise ``TypeError`` naming the calibrator; plain tensors are taken to
    be what the calibrator declares. ``fit_requires`` names keyword arguments ``fit`` needs
    beyond the scores (:data:`FIT_EXTRAS`: ``domains``, known at fit time only); a missing one
    raises :class:`sdk.RequirementError`. Scores must be floating ``[N, W]``, not empty, and
    labels of the declared form, else :class:`sdk.ShapeError` names the calibrator and the
    argument. Subclasses implement ``fit`` and ``forward`` on plain tensors (the checks wrap
    them).
    """

    inputs: ClassVar[str] = "logits"
    fit_requires: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.inputs not in CALIBRATOR_INPUTS:
            raise TypeError(f"{cls.__name__}.inputs: {cls.inputs!r} is not one of {CALIBRATOR_INPUTS}")
        unknown = set(cls.fit_requires) - set(FIT_EXTRAS)
        if unknown:
            raise TypeError(f"{cls.__name__}.fit_requires: {sorted(unknown)} are not among "
                            f"{sorted(FIT_EXTRAS)}")
        impl = vars(cls).get("fit")
        if impl is not None and not getattr(impl, "__isabstractmethod__", False):
            @functools.wraps(impl)  # named as the method, so a failure inside reads "fit()"
            def fit(self: Calibrator, scores: Tensor, labels: Tensor, *args: Any,
                    **kwargs: Any) -> Any:
                scores = self._scores(scores, "fit's scores")
                self._check_labels(scores, labels)
                self._check_extras(scores, kwargs)
                return impl(self, scores, labels, *args, **kwargs)

            cls.fit = fit

    def label_classes(self, scores: Tensor) -> int:
        """How many class ids ``fit``'s labels range over: the width of class scores; a
        ``"features"`` calibrator's ``num_classes``; 2 for binary relevance."""
        if self.inputs == "features":
            return self.num_classes
        return 2 if self.inputs == "similarities" else scores.shape[1]

    def _scores(self, x: Any, argument: str) -> Tensor:
        x = _scores(f"calibrator {self.name!r}", self.inputs, x, argument)
        layout = {"regression": "[N, 1 + D] (prediction, covariates)",
                  "similarities": "[N, 1 + D] (similarity, query embedding)"}.get(self.inputs, "[N, C]")
        if x.dim() != 2 or not x.is_floating_point():
            raise ShapeError(f"calibrator {self.name!r}: {argument} must be floating {self.inputs} "
                             f"{layout}, got {x.dtype} {list(x.shape)}")
        if x.shape[0] == 0:
            raise ShapeError(f"calibrator {self.name!r}: {argument} are empty (0 rows)")
        if self.inputs == "similarities" and x.shape[1] < 2:
            raise ShapeError(f"calibrator {self.name!r}: {argument} must hold the similarity and "
                             f"a query embedding of at least one column {layout}, got {list(x.shape)}")
        return x

    def _check_labels(self, scores: Tensor, labels: Any) -> None:
        """``labels`` must be of the form ``inputs`` declares, one per row (fit is offline:
        values are read)."""
        owner = f"calibrator {self.name!r}"
        if not isinstance(labels, Tensor):
            raise TypeError(f"{owner}: labels must be a torch.Tensor, got {type(labels).__name__}")
        n = scores.shape[0]
        if self.inputs == "regression":
            if labels.shape != (n,) or not labels.is_floating_point():
                raise ShapeError(f"{owner}: labels must be real regression targets [{n}], got "
                                 f"{labels.dtype} {list(labels.shape)}")
            return
        if labels.shape != (n,) or labels.is_floating_point():
            raise ShapeError(f"{owner}: labels must be integer class ids [{n}], got "
                             f"{labels.dtype} {list(labels.shape)}")
        if self.inputs == "similarities":
            if not bool(((labels == 0) | (labels == 1)).all()):
                raise ShapeError(f"{owner}: labels must be binary relevance (0 or 1) [{n}]")
            return
        if labels.dtype == torch.bool:
            raise ShapeError(f"{owner}: labels must be integer class ids [{n}], got "
                             f"{labels.dtype} {list(labels.shape)}")
        classes = self.label_classes(scores)
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= classes:
            raise ShapeError(f"{owner}: labels must lie in [0, {classes}), got class ids in "
                             f"[{low}, {high}]")

    def _check_extras(self, scores: Tensor, extras: Mapping[str, Any]) -> None:
        """The keyword arguments of :attr:`fit_requires` must be given as ids ``[N]``."""
        owner = f"calibrator {self.name!r}"
        n = scores.shape[0]
        for key in sorted(self.fit_requires):
            value = extras.get(key)
            if value is None:
                raise RequirementError(f"{owner}: fit needs {key}= ({FIT_EXTRAS[key]})")
            if (not isinstance(value, Tensor) or value.shape != (n,) or value.is_floating_point()
                    or value.dtype == torch.bool):
                got = (f"{value.dtype} {list(value.shape)}" if isinstance(value, Tensor)
                       else type(value).__name__)
                raise ShapeError(f"{owner}: {key} must be {FIT_EXTRAS[key]} [{n}], got {got}")
            if int(value.min()) < 0:
                raise ShapeError(f"{owner}: {key} must be non-negative ids, got {int(value.min())}")

    def __call__(self, scores: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return super().__call__(self._scores(scores, "its input"), *args, **kwargs)

    @abc.abstractmethod
    def fit(self, logits: Tensor, labels: Tensor, **extra: Any) -> Calibrator: ...

    @abc.abstractmethod
    def forward(self, logits: Tensor) -> Tensor: ...

    def predict(self, logits: Tensor) -> Tensor:
        """Class decisions; decision-rule calibrators override this."""
        return self(logits).argmax(dim=-1)

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Calibrated probabilities (the softmax of calibrated logits, which a ``"features"``
        calibrator outputs too)."""
        out = self(logits)
        return out.softmax(dim=-1) if self.inputs in ("logits", "features") else out


class Teacher(_Named, nn.Module, Constrained, abc.ABC):
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
    ``produces``: the :class:`Input` s it gives the objective (e.g. a queue's negatives).
    ``observe`` and ``update`` first check (metadata only) that views they are given are
    floating, not empty, and of the batch's size, raising :class:`sdk.ShapeError` naming the
    teacher.
    """

    produces: ClassVar[frozenset[Input]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in ("observe", "update"):
            impl = vars(cls).get(method)
            if impl is None or getattr(impl, "__isabstractmethod__", False):
                continue

            def checked(self: Teacher, *args: Any, _impl: Any = impl, **kw: Any) -> None:
                self._check(kw.get("views"), kw.get("batch"))
                return _impl(self, *args, **kw)

            setattr(cls, method, functools.wraps(impl)(checked))

    def _check(self, views: Views | None, batch: Batch | None) -> None:
        if views is None:
            return
        owner = f"teacher {self.name!r}"
        for i, z in enumerate(views.embeddings):
            if not z.is_floating_point():
                raise ShapeError(f"{owner}: Views.embeddings[{i}] must be floating point, got {z.dtype}")
        if views.embeddings and views.batch_size == 0:
            raise ShapeError(f"{owner}: empty batch (Views hold 0 samples)")
        if batch is not None and batch.batch_size is not None and batch.batch_size != views.batch_size:
            field = next(f for f in ("targets", "index", "domain", "weight") if getattr(batch, f) is not None)
            raise ShapeError(f"{owner}: Batch.{field} has {batch.batch_size} rows, but Views hold "
                             f"{views.batch_size} samples")

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


class DataSampler(torch.utils.data.Sampler, Constrained):
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


class Transform(_Named, nn.Module, Constrained, abc.ABC):
    """Tensor-level view generation or input transformation: ``forward(x, batch) -> (x, batch)``.

    ``produces``: the :class:`Input` s it writes into the batch for the objective. Calling it
    first checks (metadata only) that ``x`` is a non-empty batch ``[B, ...]`` of the batch's
    size, raising :class:`sdk.ShapeError` naming the transform."""

    produces: ClassVar[frozenset[Input]] = frozenset()

    def __call__(self, x: Tensor, batch: Batch, *args: Any, **kwargs: Any) -> tuple[Tensor, Batch]:
        owner = f"transform {self.name!r}"
        if not isinstance(x, Tensor) or x.dim() == 0:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{owner}: x must be a batch tensor [B, ...], got {shape}")
        if x.shape[0] == 0:
            raise ShapeError(f"{owner}: empty batch (x has 0 rows)")
        if batch.batch_size is not None and batch.batch_size != x.shape[0]:
            field = next(f for f in ("targets", "index", "domain", "weight") if getattr(batch, f) is not None)
            raise ShapeError(f"{owner}: Batch.{field} has {batch.batch_size} rows, but x has "
                             f"{x.shape[0]}")
        return super().__call__(x, batch, *args, **kwargs)

    @abc.abstractmethod
    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]: ...


class Schedule(Constrained, abc.ABC):
    """A value as a function of progress: ``schedule(step, max_steps) -> float``."""

    @abc.abstractmethod
    def __call__(self, step: int, max_steps: int | None = None) -> float: ...

    @staticmethod
    def check_progress(plugin: str, step: Any, max_steps: Any) -> None:
        """Refuse, naming ``plugin``, a ``step`` that is no integer >= 0 (optimizer steps taken)
        or a ``max_steps`` that is neither None (an open-ended run) nor an integer >= 1."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"{plugin}: step must be an integer >= 0 (optimizer steps taken), "
                              f"got {step!r}", param="step")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 1):
            raise ConfigError(f"{plugin}: max_steps must be None or an integer >= 1 (None: an "
                              f"open-ended run), got {max_steps!r}", param="max_steps")

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
    """Reacts to engine events: override any subset of the methods named after the
    :class:`sdk.events.Event` members; each receives the run's :class:`sdk.events.State`."""

    reads_per_sample_loss: ClassVar[bool] = False
    """Whether a listener reads ``state.loss.per_sample`` (the Trainer then has the objective
    compute it; see :attr:`Objective.per_sample_requested`)."""

    reads_unlabeled: ClassVar[bool] = False
    """Whether a listener reads the unlabelled batch's outputs (``Views.extras[keys.UNLABELED]``):
    a Trainer fitted with an unlabelled loader needs an objective or a callback that does."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless callbacks have nothing to restore."""


class Detector(_Named, nn.Module, Constrained, abc.ABC):
    """Out-of-distribution scoring: ``detector.score(x) -> Tensor[N]``, higher = more anomalous.

    ``x`` is ``[N, D]``: features, logits or probabilities, as :attr:`inputs` declares (typed
    scores of another kind raise). A detector that learns from in-distribution data (class
    means and a shared covariance, a feature bank) overrides :meth:`accumulate` and
    :meth:`summarize` and keeps what they compute in buffers, so ``state_dict`` carries a fitted
    detector. Fitting streams: :meth:`update` per batch accumulates sufficient statistics,
    :meth:`finalize` turns them into what ``forward`` uses; :meth:`fit` does both over a tensor
    or an iterable of batches. Scoring before ``finalize`` raises
    :class:`sdk.errors.NotFittedError`. A detector that overrides neither (maximum softmax
    probability, energy) has ``needs_fit = False`` and scores unfitted. Once data was seen,
    ``score`` checks that ``x`` has its width ``D``.
    """

    inputs: ClassVar[str] = "features"
    needs_labels: ClassVar[bool] = False
    """Whether :meth:`update` needs class ids (class-conditional statistics)."""
    needs_fit: ClassVar[bool] = False
    """Whether scoring needs a fit; true for a detector class that overrides :meth:`accumulate`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.inputs not in ("features", *SCORE_KINDS):
            raise TypeError(f"{cls.__name__}.inputs: {cls.inputs!r} is not one of "
                            f"{('features', *SCORE_KINDS)}")
        if "needs_fit" not in vars(cls):
            cls.needs_fit = cls.accumulate is not Detector.accumulate

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("in_dim", torch.full((), -1, dtype=torch.long))
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool))

    def _rows(self, x: Any, method: str) -> Tensor:
        x = _scores(f"detector {self.name!r}", self.inputs, x, f"{method}'s x")
        if x.dim() != 2 or not x.is_floating_point():
            raise ShapeError(f"detector {self.name!r}: {method} expects floating {self.inputs} "
                             f"[N, D], got {x.dtype} {list(x.shape)}")
        width = int(self.in_dim)
        if width >= 0 and x.shape[1] != width:
            raise ShapeError(f"detector {self.name!r}: {method} got {self.inputs} of width "
                             f"{x.shape[1]}, but it was fitted on width {width}")
        return x

    def update(self, x: Tensor, labels: Tensor | None = None) -> None:
        """Accumulate one batch of in-distribution data (``labels``: class ids ``[N]``)."""
        x = self._rows(x, "update")
        if labels is None and self.needs_labels:
            raise RequirementError(f"detector {self.name!r} needs labels (class ids [N]) in update")
        if labels is not None and (labels.shape != (x.shape[0],) or labels.is_floating_point()):
            raise ShapeError(f"detector {self.name!r}: labels must be integer class ids "
                             f"[{x.shape[0]}], got {labels.dtype} {list(labels.shape)}")
        with torch.no_grad():
            self.accumulate(x.detach(), labels)
            self.num_seen += x.shape[0]
            self.in_dim.fill_(x.shape[1])
            self.is_fitted.fill_(False)

    def finalize(self) -> Detector:
        """Compute what scoring uses from the accumulated statistics; returns ``self``."""
        if self.needs_fit and int(self.num_seen) == 0:
            raise NotFittedError(f"detector {self.name!r}: finalize() before any update() "
                                 "(no in-distribution data seen)")
        with torch.no_grad():
            self.summarize()
            self.is_fitted.fill_(True)
        return self

    def fit(self, data: Tensor | Iterable[Any], labels: Tensor | None = None) -> Detector:
        """:meth:`update` with ``data`` (a tensor ``[N, D]`` with optional ``labels``, or an
        iterable of batches: tensors or ``(x, labels, ...)`` tuples as a DataLoader gives
        them), then :meth:`finalize`. On a detector that saw data already, continue with
        ``update``/``finalize`` instead (``fit`` refuses)."""
        if int(self.num_seen) > 0:
            raise RuntimeError(f"detector {self.name!r}: fit() on a detector that has seen data; "
                               "build a new one, or continue with update() and finalize()")
        if isinstance(data, Tensor):
            self.update(data, labels)
        else:
            if labels is not None:
                raise TypeError(f"detector {self.name!r}: with an iterable of batches, labels go "
                                "inside each batch as (x, labels)")
            for item in data:
                if isinstance(item, Tensor):
                    self.update(item)
                else:
                    self.update(item[0], item[1] if len(item) > 1 else None)
        return self.finalize()

    def __call__(self, x: Tensor) -> Tensor:
        x = self._rows(x, "score")
        if self.needs_fit and not bool(self.is_fitted):
            raise NotFittedError(f"detector {self.name!r}: score() before fit() (or update() and "
                                 "finalize())")
        out = super().__call__(x)
        if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(f"detector {self.name!r}: forward returned {shape}, expected scores "
                             f"[{x.shape[0]}]")
        return out

    def score(self, x: Tensor) -> Tensor:
        """Anomaly scores ``[N]`` of ``x`` ``[N, D]``; higher = more anomalous."""
        return self(x)

    def accumulate(self, x: Tensor, labels: Tensor | None) -> None:
        """Add a batch (checked, detached) to the statistics; fitted detectors override this."""

    def summarize(self) -> None:
        """Turn the statistics into what ``forward`` uses (e.g. invert a covariance)."""

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor: ...


class Adapter(_Named, nn.Module, Constrained, abc.ABC):
    """Test-time adaptation: ``adapter.adapt(model, x, batch=None) -> Tensor`` adapts ``model``
    on one test batch ``x`` and returns the adapted model's outputs on it; :meth:`reset`
    restores the model and the adapter as they were before.

    The first ``adapt`` after construction or ``reset`` records the model's ``state_dict``, its
    modules' train/eval modes and its parameters' ``requires_grad``, and the adapter's own
    ``state_dict``; ``reset`` puts all of them back (an episodic method resets before every
    batch). Subclasses implement ``forward(model, x, batch)``: one adaptation step and the
    outputs; an adapter holding state outside its ``state_dict`` (an optimizer) extends
    ``reset``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._initial: tuple[nn.Module, dict[str, Any], list[bool], list[bool], dict[str, Any]] | None = None

    def adapt(self, model: nn.Module, x: Tensor, batch: Batch | None = None) -> Tensor:
        """Adapt ``model`` on the test batch ``x`` and return its outputs on it."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"adapter {self.name!r}: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise ShapeError(f"adapter {self.name!r}: x must be a batch tensor [B, ...], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[0] == 0:
            raise ShapeError(f"adapter {self.name!r}: empty batch (x has 0 rows)")
        batch = Batch() if batch is None else batch
        if not isinstance(batch, Batch):
            raise TypeError(f"adapter {self.name!r}: batch must be sdk.Batch, got {type(batch).__name__}")
        if batch.batch_size is not None and batch.batch_size != x.shape[0]:
            raise ShapeError(f"adapter {self.name!r}: Batch size {batch.batch_size} does not match "
                             f"x's {x.shape[0]}")
        if self._initial is None:
            self._initial = (model, _copy_state(model.state_dict()),
                             [m.training for m in model.modules()],
                             [p.requires_grad for p in model.parameters()],
                             _copy_state(self.state_dict()))
        elif self._initial[0] is not model:
            raise RuntimeError(f"adapter {self.name!r} is adapting another model since its last "
                               "reset(); call reset() first")
        out = self(model, x, batch)
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(f"adapter {self.name!r}: forward returned {shape}, expected outputs "
                             f"[{x.shape[0]}, ...]")
        return out

    def reset(self) -> None:
        """Restore the model and the adapter to their state before the first ``adapt``."""
        if self._initial is None:
            return
        model, state, modes, flags, own = self._initial
        model.load_state_dict(state)
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
        self.load_state_dict(own)
        self._initial = None

    @abc.abstractmethod
    def forward(self, model: nn.Module, x: Tensor, batch: Batch) -> Tensor: ...


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in state.items()}



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
    "transform": Transform, "callback": Callback, "detector": Detector, "adapter": Adapter,
}
