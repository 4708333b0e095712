"""Fuzzed inputs for the conformance kit (:func:`sdk.testing.check_plugin` runs them).

:func:`fuzz_plugin` draws inputs with hypothesis (a test extra, imported only when a fuzz runs)
for a plugin of the kinds whose inputs the kit builds (objectives, pair samplers, encoders,
transforms, reweighters, calibrators, and metrics that give ``example_inputs``):

* **valid inputs** over shapes (batch 1, 2, odd and large; 1-4 views as the plugin requires;
  widths D and classes C from 1 up), dtypes (float32, bfloat16, float64) and values (large
  magnitudes, near-duplicate rows, all-equal rows, zero rows) must give a finite result with
  finite gradients, or a paperplug error (``ShapeError``, ``RequirementError``, ``ConfigError``)
  whose message names the plugin: what the plugin documents it cannot handle (e.g. a batch of
  one without negatives). Ordinary inputs (batch >= 4, D >= 2, C >= 2, Gaussian values) must
  not be refused.
* **invalid inputs** (batch sizes that disagree, labels out of range, an empty batch, integer
  embeddings or logits, targets of the wrong rank, a missing required field) must raise a
  paperplug error naming the plugin and the field; never an error from inside torch. Ids out
  of range in a training step are tried on CPU only (on CUDA the device asserts; checking
  first would cost a host sync per call).
* **non-finite inputs** (NaN or inf in embeddings or logits) are not checked by plugins (that
  would cost a host sync per call): an objective's loss must come out non-finite, so the
  engine's guard sees it, or it raises a paperplug error.

Every run is derandomized (no example database, no deadline), so CI sees the same examples.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sdk import testing
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.interfaces import Calibrator, Encoder, Metric, Objective, Reweighter, Sampler, Transform
from sdk.testing import CLASSES, DIM
from sdk.types import Batch, Loss, Pairs, Views

ERRORS = (ShapeError, RequirementError, ConfigError)
"""What a plugin may raise for an input it cannot take."""

BATCH_SIZES = (1, 2, 3, 5, 8, 13, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
PATTERNS = ("gaussian", "large", "near_duplicates", "equal_rows", "zero_rows")


class Case(NamedTuple):
    """One drawn input: sizes, dtype, value pattern and the seed of its random values."""

    batch: int
    views: int
    dim: int
    classes: int
    dtype: torch.dtype
    pattern: str
    seed: int

    @property
    def ordinary(self) -> bool:
        return self.batch >= 4 and self.dim >= 2 and self.classes >= 2 and self.pattern == "gaussian"


class _Plugin(NamedTuple):
    label: str  # "objective nt_xent", as the kit's failures name it
    names: tuple[str, ...]  # what an error message may call it: registry and class name
    make: Callable[[], Any]


def _fail(p: _Plugin, check: str, detail: str) -> AssertionError:
    return AssertionError(f"[{p.label}] fuzz {check}: {detail}")


def _pattern(t: Tensor, pattern: str, g: torch.Generator) -> Tensor:
    """``t`` [B, ...] (float32) with the values of ``pattern``."""
    if pattern == "large":
        return t * 1e4
    if pattern == "near_duplicates":
        return t[:1] + 1e-3 * torch.randn(t.shape, generator=g)
    if pattern == "equal_rows":
        return t[:1].expand_as(t).clone()
    if pattern == "zero_rows":
        t = t.clone()
        t[::2] = 0
        return t
    return t


def _leaf(t: Tensor, case: Case, g: torch.Generator) -> Tensor:
    return _pattern(t.detach().float(), case.pattern, g).to(case.dtype).requires_grad_(t.requires_grad)


def _device_inputs(obj: Any) -> Any:
    return testing._to(obj, testing._DEVICE)


# what each kind is fed -----------------------------------------------------------------------
def _objective_inputs(obj: Objective, case: Case) -> tuple[Views, Batch]:
    g = torch.Generator().manual_seed(case.seed)
    own = getattr(obj, "example_inputs", None)
    if callable(own):
        views, batch = own(case.batch, g)
    else:
        views, batch = testing.objective_inputs(obj, g, case.batch, n_views=case.views, dim=case.dim,
                                                classes=case.classes)
        batch = batch.evolve(targets=torch.randint(0, case.classes, (case.batch,), generator=g))
    views, batch = testing._map(testing._cast((views, batch), case.dtype),
                                lambda t: _leaf(t, case, g) if t.requires_grad else t)
    return _device_inputs((views, batch))


def _sampler_inputs(case: Case) -> tuple[Views, Batch]:
    g = torch.Generator().manual_seed(case.seed)
    b = case.batch
    views = Views(embeddings=tuple(_leaf(torch.randn(b, case.dim, generator=g), case, g)
                                   for _ in range(case.views)))
    batch = Batch(targets=torch.randint(0, case.classes, (b,), generator=g),
                  index=torch.randperm(b, generator=g))
    return _device_inputs((views, batch))


def _batch_of(batch: Batch, rows: int, g: torch.Generator) -> Batch:
    """``batch`` with every per-sample field given ``rows`` rows (values drawn anew)."""
    changes: dict[str, Any] = {}
    for field in ("targets", "index", "domain", "weight"):
        value = getattr(batch, field)
        if value is None:
            continue
        if value.is_floating_point():
            changes[field] = torch.rand((rows, *value.shape[1:]), generator=g).to(value)
        else:
            changes[field] = torch.randint(0, 2, (rows, *value.shape[1:]), generator=g).to(value)
    return batch.evolve(**changes)


def _first_field(batch: Batch) -> str:
    return next(f for f in ("targets", "index", "domain", "weight") if getattr(batch, f) is not None)


def _rows(obj: Any, b: int, keep: int) -> Any:
    """``obj`` (records, tuples, dicts) with every tensor of ``b`` rows cut to its first ``keep``."""
    return testing._map(obj, lambda t: (t.detach()[:keep].requires_grad_(t.requires_grad)
                                        if t.dim() and t.shape[0] == b else t))


# outcomes ----------------------------------------------------------------------------------------
def _names_plugin(p: _Plugin, message: str) -> bool:
    return any(n in message for n in p.names)


def _names_field(message: str, fields: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(f)}(?![A-Za-z_])", message) for f in fields)


def _try(p: _Plugin, what: str, call: Callable[[], Any], *, refuse: bool) -> Any:
    """The result of ``call``, or None where it raised a paperplug error naming the plugin
    (allowed where ``refuse``); any other exception fails the fuzz."""
    try:
        return call()
    except ERRORS as exc:
        if not refuse:
            raise _fail(p, "valid input", f"an ordinary input ({what}) was refused: "
                        f"{type(exc).__name__}: {exc}") from exc
        if not _names_plugin(p, str(exc)):
            raise _fail(p, "valid input", f"{what}: the error does not name the plugin: {exc}") from exc
        return None
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(p, "valid input", f"{what} raised {type(exc).__name__}: {exc}; expected a "
                    "result or a paperplug error") from exc


def _expect_error(p: _Plugin, what: str, fields: tuple[str, ...], call: Callable[[], Any], *,
                  strict: bool = True) -> None:
    """``call`` must raise a paperplug error naming the plugin and one of ``fields``
    (``strict=False``: or succeed)."""
    try:
        call()
    except ERRORS as exc:
        message = str(exc)
        if not (_names_plugin(p, message) and _names_field(message, fields)):
            raise _fail(p, "invalid input", f"{what}: the error must name the plugin "
                        f"({' or '.join(p.names)}) and the field ({' or '.join(fields)}): "
                        f"{type(exc).__name__}: {exc}") from exc
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(p, "invalid input", f"{what} raised {type(exc).__name__}: {exc}; expected "
                    "sdk.ShapeError, RequirementError or ConfigError") from exc
    else:
        if strict:
            raise _fail(p, "invalid input", f"{what} was accepted")


def _finite_grads(p: _Plugin, what: str, inputs: Any, value: Tensor, plugin: Any = None) -> None:
    """The gradients of ``value`` with respect to the inputs and ``plugin``'s parameters are finite."""
    leaves = [t for t in testing._tensors(inputs) if t.requires_grad]
    if isinstance(plugin, torch.nn.Module):
        leaves += [q for q in plugin.parameters() if q.requires_grad]
    if not leaves or not value.requires_grad:
        return
    for i, grad in enumerate(torch.autograd.grad(value, leaves, allow_unused=True)):
        if grad is not None and not torch.isfinite(grad).all():
            raise _fail(p, "valid input", f"{what}: the gradient of input #{i} is not finite")


def _finite(p: _Plugin, what: str, name: str, t: Tensor | None) -> None:
    if t is not None and not torch.isfinite(t.detach().float()).all():
        raise _fail(p, "valid input", f"{what}: {name} is not finite")


# objectives --------------------------------------------------------------------------------------
def _valid_objective(p: _Plugin, case: Case) -> None:
    obj = p.make()
    views, batch = _objective_inputs(obj, case)
    loss = _try(p, repr(case), lambda: obj(views, batch), refuse=not case.ordinary)
    if loss is None:
        return
    if not isinstance(loss, Loss):
        raise _fail(p, "valid input", f"{case}: returned {type(loss).__name__}, expected Loss")
    _finite(p, repr(case), "the loss", loss.value)
    _finite(p, repr(case), "Loss.per_sample", loss.per_sample)
    _finite_grads(p, repr(case), (views, batch), loss.value, obj)


def _objective_mutations(obj: Objective, views: Views, batch: Batch, g: torch.Generator
                         ) -> list[tuple[str, tuple[str, ...], bool, Views, Batch]]:
    """``(what, fields the error must name, strict, views, batch)`` for each invalid input
    that applies to ``obj`` (``strict=False``: the input may also be accepted). Ids out of
    range are tried on CPU only: on CUDA torch asserts on the device, which plugins leave be
    (catching it would cost a host sync per call)."""
    req = obj.requires
    cpu = testing._DEVICE.type == "cpu"
    b = views.batch_size
    out: list[tuple[str, tuple[str, ...], bool, Views, Batch]] = []
    for field in ("targets", "index", "domain", "weight"):
        if req.get(field):
            out.append((f"no Batch.{field}", (field,), True, views, batch.evolve(**{field: None})))
    if req.get("logits"):
        out.append(("no Views.logits", ("logits",), True, views.evolve(logits=None), batch))
    for key in req.get("extras", ()):
        if key in views.extras:
            out.append((f"no extras[{key!r}]", (key,), True,
                        views.evolve(extras={k: v for k, v in views.extras.items() if k != key}), batch))
    if batch.batch_size is not None:
        out.append((f"a Batch of {b + 1} rows for {b} samples", (_first_field(batch),), True, views,
                    _batch_of(batch, b + 1, g)))
    out.append(("an empty batch", ("empty",), True, *_rows((views, batch), b, 0)))
    if views.embeddings:
        ints = tuple(torch.ones(z.shape, dtype=torch.long, device=z.device) for z in views.embeddings)
        out.append(("integer embeddings", ("embeddings",), True, views.evolve(embeddings=ints), batch))
    if views.logits is not None:
        out.append(("integer logits", ("logits",), True,
                    views.evolve(logits=torch.ones(views.logits.shape, dtype=torch.long,
                                                   device=views.logits.device)), batch))
    for bad in (float("nan"), float("inf")):  # in the first entry of every input with a gradient
        out.append((f"{bad} in the inputs", (), False, *_with_value((views, batch), bad)))
    targets = batch.targets
    if req.get("targets") and targets is not None and targets.dim() == 1:
        out.append(("targets of rank 3", ("targets",), True, views,
                    batch.evolve(targets=targets[:, None, None])))
        out.append(("float class ids", ("targets",), False, views, batch.evolve(targets=targets.float())))
        if views.logits is not None and not targets.is_floating_point() and cpu:
            c = views.logits.shape[1]
            for bad in (c, -1):
                t = targets.clone()
                t[0] = bad
                out.append((f"class id {bad} for {c} classes", ("targets",), True, views,
                            batch.evolve(targets=t)))
    if req.get("index") and batch.index is not None and cpu:
        t = batch.index.clone()
        t[0] = -1
        out.append(("index -1", ("index",), True, views, batch.evolve(index=t)))
    return out


def _with_value(obj: Any, value: float) -> Any:
    """``obj`` with the first entry of every tensor that requires grad set to ``value``."""
    def put(t: Tensor) -> Tensor:
        if not t.requires_grad:
            return t
        t = t.detach().clone()
        t.view(-1)[0] = value
        return t.requires_grad_()

    return testing._map(obj, put)


def _nonfinite_outcome(p: _Plugin, what: str, obj: Objective, views: Views, batch: Batch) -> None:
    loss = _try(p, what, lambda: obj(views, batch), refuse=True)
    if loss is not None and torch.isfinite(loss.value.detach().float()):
        raise _fail(p, "non-finite input", f"{what}: the loss is finite ({float(loss.value):.4g}); "
                    "a non-finite input must give a non-finite loss (or a paperplug error)")


def _invalid_objective(p: _Plugin, case: Case, choice: int) -> None:
    obj = p.make()
    views, batch = _objective_inputs(obj, case._replace(batch=max(case.batch, 2)))
    mutations = _objective_mutations(obj, views, batch, torch.Generator().manual_seed(case.seed))
    what, fields, strict, bad_views, bad_batch = mutations[choice % len(mutations)]
    if not fields:
        _nonfinite_outcome(p, what, obj, bad_views, bad_batch)
    else:
        _expect_error(p, what, fields, lambda: obj(bad_views, bad_batch), strict=strict)


# samplers ----------------------------------------------------------------------------------------
def _valid_sampler(p: _Plugin, case: Case) -> None:
    sampler = p.make()
    views, batch = _sampler_inputs(case)
    pairs = _try(p, repr(case), lambda: sampler.pairs(views, batch), refuse=not case.ordinary)
    if pairs is None:
        return
    n = views.n_views * views.batch_size
    if not isinstance(pairs, Pairs) or pairs.positive.shape != (n, n):
        shape = list(pairs.positive.shape) if isinstance(pairs, Pairs) else type(pairs).__name__
        raise _fail(p, "valid input", f"{case}: masks {shape}, expected [{n}, {n}]")
    for name in ("weight", "extra_negatives", "extra_negative_sims"):
        _finite(p, repr(case), f"Pairs.{name}", getattr(pairs, name))


def _invalid_sampler(p: _Plugin, case: Case, choice: int) -> None:
    sampler = p.make()
    views, batch = _sampler_inputs(case._replace(batch=max(case.batch, 2)))
    b = views.batch_size
    g = torch.Generator().manual_seed(case.seed)
    ints = tuple(torch.ones(z.shape, dtype=torch.long) for z in views.embeddings)
    mutations = [
        (f"a Batch of {b + 1} rows for {b} samples", ("targets",), True, views, _batch_of(batch, b + 1, g)),
        ("an empty batch", ("empty",), True, *_rows((views, batch), b, 0)),
        ("integer embeddings", ("embeddings",), True, views.evolve(embeddings=ints), batch),
        ("no Batch.targets", ("targets",), False, views, batch.evolve(targets=None)),
        ("targets of rank 3", ("targets",), False, views, batch.evolve(targets=batch.targets[:, None, None])),
    ]
    what, fields, strict, bad_views, bad_batch = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: sampler.pairs(*_device_inputs((bad_views, bad_batch))),
                  strict=strict)


# encoders ----------------------------------------------------------------------------------------
def _encoder_input(enc: Encoder, case: Case) -> Tensor:
    g = torch.Generator().manual_seed(case.seed)
    own = getattr(enc, "example_inputs", None)
    x = own(case.batch, g) if callable(own) else torch.randn(case.batch, enc.in_dim, generator=g)
    dtype = torch.float64 if case.dtype == torch.float64 else torch.float32  # bfloat16: autocast
    return _device_inputs(_pattern(x.float(), case.pattern, g).to(dtype))


def _valid_encoder(p: _Plugin, case: Case) -> None:
    enc = p.make()
    if case.dtype == torch.float64:
        enc = enc.double()
    x = _encoder_input(enc, case)
    with torch.autocast(testing._DEVICE.type, dtype=torch.bfloat16, enabled=case.dtype == torch.bfloat16):
        z = _try(p, repr(case), lambda: enc(x), refuse=not case.ordinary)
    if z is None:
        return
    if z.shape != (x.shape[0], enc.out_dim):
        raise _fail(p, "valid input", f"{case}: output {list(z.shape)}, expected "
                    f"[{x.shape[0]}, {enc.out_dim}]")
    _finite(p, repr(case), "the output", z)
    params = [q for q in enc.parameters() if q.requires_grad]
    for i, grad in enumerate(torch.autograd.grad(z.float().pow(2).mean(), params, allow_unused=True)):
        if grad is not None and not torch.isfinite(grad).all():
            raise _fail(p, "valid input", f"{case}: the gradient of parameter #{i} is not finite")


def _invalid_encoder(p: _Plugin, case: Case, choice: int) -> None:
    enc = p.make()
    x = _encoder_input(enc, case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    mutations = [
        ("an input of rank 1", x[0]),
        ("an input of rank 3", x[None]),
        ("an input one column too wide", torch.cat([x, x[:, :1]], dim=1)),
        ("an integer input", x.long()),
    ]
    what, bad = mutations[choice % len(mutations)]
    _expect_error(p, what, ("x",), lambda: enc(bad))


# transforms --------------------------------------------------------------------------------------
def _transform_inputs(tf: Transform, case: Case) -> tuple[Tensor, Batch]:
    g = torch.Generator().manual_seed(case.seed)
    own = getattr(tf, "example_inputs", None)
    if callable(own):
        x, batch = own(case.batch, g)
    else:
        x = torch.randn(case.batch, case.dim, generator=g)
        batch = Batch(targets=torch.randint(0, case.classes, (case.batch,), generator=g),
                      index=torch.arange(case.batch))
    x = _pattern(x.float(), case.pattern, g).to(case.dtype)
    return _device_inputs((x, testing._cast(batch, case.dtype)))


def _valid_transform(p: _Plugin, case: Case) -> None:
    tf = p.make()
    x, batch = _transform_inputs(tf, case)
    out = _try(p, repr(case), lambda: tf(x, batch), refuse=not case.ordinary)
    if out is None:
        return
    if out[0].shape[0] != x.shape[0]:
        raise _fail(p, "valid input", f"{case}: the batch dimension changed from {x.shape[0]} to "
                    f"{out[0].shape[0]}")
    _finite(p, repr(case), "the output", out[0])


def _invalid_transform(p: _Plugin, case: Case, choice: int) -> None:
    tf = p.make()
    x, batch = _transform_inputs(tf, case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    b = x.shape[0]
    g = torch.Generator().manual_seed(case.seed)
    mutations = [("an input without a batch dimension", ("x",), True, x.flatten()[0], batch),
                 ("an empty batch", ("empty",), False, *_rows((x, batch), b, 0))]
    if batch.batch_size is not None:
        mutations.append((f"a Batch of {b + 1} rows for {b} samples", (_first_field(batch),), True, x,
                          _device_inputs(_batch_of(batch, b + 1, g))))
    what, fields, strict, bad_x, bad_batch = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: tf(bad_x, bad_batch), strict=strict)


# reweighters -------------------------------------------------------------------------------------
def _reweighter_inputs(case: Case) -> tuple[Tensor, Batch]:
    g = torch.Generator().manual_seed(case.seed)
    b = case.batch
    per = _pattern(torch.rand(b, 1, generator=g), case.pattern, g)[:, 0]
    batch = Batch(targets=torch.randint(0, case.classes, (b,), generator=g), index=torch.arange(b),
                  domain=torch.arange(b) % 2)
    return _device_inputs((per.to(case.dtype).requires_grad_(), batch))


def _valid_reweighter(p: _Plugin, case: Case) -> None:
    rw = p.make()
    per, batch = _reweighter_inputs(case)
    loss = _try(p, repr(case), lambda: rw.reduce(Loss(value=per.mean(), per_sample=per), batch),
                refuse=not case.ordinary)
    if loss is None:
        return
    _finite(p, repr(case), "the reduced loss", loss.value)
    _finite_grads(p, repr(case), per, loss.value)


def _invalid_reweighter(p: _Plugin, case: Case, choice: int) -> None:
    rw = p.make()
    per, batch = _reweighter_inputs(case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    b = per.shape[0]
    g = torch.Generator().manual_seed(case.seed)
    fields = ("per_sample", "domain", "targets", "index")
    mutations = [(f"a Batch of {b + 1} rows for {b} losses", fields, True, per,
                  _device_inputs(_batch_of(batch, b + 1, g))),
                 ("group id -1", ("domain",), False, per, batch.evolve(domain=batch.domain - 1)),
                 ("group id 1000", ("domain",), False, per, batch.evolve(domain=batch.domain + 1000)),
                 ("no Batch.domain", ("domain",), False, per, batch.evolve(domain=None))]
    what, fields, strict, bad_per, bad_batch = mutations[choice % len(mutations)]
    _expect_error(p, what, fields,
                  lambda: rw.reduce(Loss(value=bad_per.mean(), per_sample=bad_per), bad_batch), strict=strict)


# calibrators -------------------------------------------------------------------------------------
def _calibrator_inputs(cal: Calibrator, case: Case) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    n, c = case.batch, case.classes
    labels = torch.randint(0, c, (n,), generator=g)
    logits = _pattern(3 * torch.nn.functional.one_hot(labels, c) + torch.randn(n, c, generator=g),
                      case.pattern, g).to(case.dtype)
    scores = logits if cal.inputs == "logits" else logits.float().softmax(-1).to(case.dtype)
    return _device_inputs((scores, labels))


def _valid_calibrator(p: _Plugin, case: Case) -> None:
    cal = p.make()
    scores, labels = _calibrator_inputs(cal, case)

    def run() -> Tensor:
        cal.fit(scores, labels)
        return cal(scores)

    out = _try(p, repr(case), run, refuse=not case.ordinary)
    if out is None:
        return
    if out.shape != scores.shape:
        raise _fail(p, "valid input", f"{case}: calibrated {list(out.shape)}, expected {list(scores.shape)}")
    _finite(p, repr(case), "the calibrated scores", out)


def _invalid_calibrator(p: _Plugin, case: Case, choice: int) -> None:
    cal = p.make()
    scores, labels = _calibrator_inputs(cal, case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    c = scores.shape[1]
    mutations = [("labels of another length", ("labels",), scores, labels[:-1]),
                 (f"class id {c} for {c} classes", ("labels",), scores, labels.clone().fill_(c)),
                 ("class id -1", ("labels",), scores, labels.clone().fill_(-1)),
                 ("float labels", ("labels",), scores, labels.float()),
                 ("scores of rank 1", ("scores", "logits", "probabilities"), scores[:, 0], labels),
                 ("integer scores", ("scores", "logits", "probabilities"), scores.long(), labels),
                 ("an empty set", ("empty",), scores[:0], labels[:0])]
    what, fields, bad_scores, bad_labels = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: cal.fit(bad_scores, bad_labels))


# metrics -----------------------------------------------------------------------------------------
def _metric_args(metric: Metric, case: Case) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(case.seed)
    args = metric.example_inputs(case.batch, g)
    return _device_inputs(tuple(a.to(case.dtype) if a.is_floating_point() else a for a in args))


def _valid_metric(p: _Plugin, case: Case) -> None:
    metric = p.make()
    args = _metric_args(metric, case)

    def run() -> Any:
        metric.update(*args)
        return metric.compute()

    out = _try(p, repr(case), run, refuse=not case.ordinary)
    if out is None:
        return
    values = list(out.values()) if isinstance(out, dict) else [out]
    if not all(isinstance(v, float) for v in values):
        raise _fail(p, "valid input", f"{case}: compute() returned {out!r}, expected floats")
    if case.ordinary and not all(math.isfinite(v) for v in values):
        raise _fail(p, "valid input", f"{case}: compute() returned {out!r} for an ordinary input")


def _invalid_metric(p: _Plugin, case: Case, choice: int) -> None:
    metric = p.make()
    args = _metric_args(metric, case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    fields = tuple(inspect.signature(metric.update).parameters) + ("scores",)
    mutations = []
    for i, a in enumerate(args):
        other = a[0] if a.dim() == 2 else a[:, None]
        mutations.append((f"argument {i} of rank {other.dim()}", (*args[:i], other, *args[i + 1:])))
        if not a.is_floating_point():
            mutations.append((f"argument {i} as floats", (*args[:i], a.float(), *args[i + 1:])))
    if len(args) > 1:
        mutations.append(("a last argument one row short", (*args[:-1], args[-1][:-1])))
    what, bad = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: metric.update(*bad))


# driver ------------------------------------------------------------------------------------------
_KINDS: dict[type, tuple[Callable[[_Plugin, Case], None], Callable[[_Plugin, Case, int], None]]] = {
    Objective: (_valid_objective, _invalid_objective), Sampler: (_valid_sampler, _invalid_sampler),
    Encoder: (_valid_encoder, _invalid_encoder), Transform: (_valid_transform, _invalid_transform),
    Reweighter: (_valid_reweighter, _invalid_reweighter),
    Calibrator: (_valid_calibrator, _invalid_calibrator), Metric: (_valid_metric, _invalid_metric),
}


def fuzzable(plugin: Any) -> bool:
    """Whether :func:`fuzz_plugin` has inputs for ``plugin``: of a kind it fuzzes, and for a
    metric, an ``example_inputs(batch_size, generator)`` giving ``update``'s arguments."""
    if isinstance(plugin, Metric):
        return callable(getattr(plugin, "example_inputs", None))
    return any(isinstance(plugin, base) for base in _KINDS)


def _cases(plugin: Any) -> Any:
    from hypothesis import strategies as st

    views = st.integers(2, 4)
    if isinstance(plugin, Objective):
        need = int(plugin.requires.get("views", 0))
        if need:
            views = st.integers(need, max(need, 4))
        elif plugin.requires.get("logits"):
            views = st.just(0)
    return st.builds(Case, batch=st.sampled_from(BATCH_SIZES), views=views, dim=st.integers(1, 24),
                     classes=st.integers(1, 7), dtype=st.sampled_from(DTYPES),
                     pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16))


def fuzz_plugin(kind: str, name: str, *, max_examples: int = 30, registry: Any = None,
                device: str | torch.device = "cpu", **params: Any) -> None:
    """Fuzz plugin ``name`` of ``kind`` (built with ``params``): ``max_examples`` drawn valid
    inputs and as many invalid ones (see the module docstring). Plugins without fuzzed inputs
    (schedules, callbacks, teachers, data-level samplers, metrics without ``example_inputs``)
    are skipped.
    Failures raise ``AssertionError`` naming the plugin, the input and what went wrong.

    Needs hypothesis (``pip install paperplug[test]``), imported here rather than by ``sdk``.
    """
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from sdk.registry import get_registry

    testing._DEVICE = torch.device(device)
    reg = registry if registry is not None else get_registry()

    def make() -> Any:
        torch.manual_seed(0)
        plugin = reg.create(kind, name, **params)
        return plugin.to(testing._DEVICE) if isinstance(plugin, torch.nn.Module) else plugin

    plugin = make()
    if not fuzzable(plugin):
        return
    valid, invalid = next(c for base, c in _KINDS.items() if isinstance(plugin, base))
    p = _Plugin(f"{kind} {name}", (name, type(plugin).__name__), make)
    config = settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), print_blob=False,
                      report_multiple_bugs=False)
    cases = _cases(plugin)
    views = max(2, int(getattr(plugin, "requires", {}).get("views", 0)))
    if isinstance(plugin, Objective) and not plugin.requires.get("views") and plugin.requires.get("logits"):
        views = 0
    ordinary = [Case(8, views, DIM, CLASSES, dtype, "gaussian", 0) for dtype in DTYPES]

    def valid_property(case: Case) -> None:
        valid(p, case)

    for case in ordinary:  # always tried, whatever hypothesis draws
        valid_property = example(case)(valid_property)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    try:
        config(given(cases)(valid_property))()
        config(given(cases, st.integers(0, 63))(lambda case, choice: invalid(p, case, choice)))()
    finally:
        torch.set_num_threads(threads)
