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
  paperplug error naming the plugin and the field; never an error from inside torch. An
  objective declaring ``accepts_unknown`` gets valid batches in which about a quarter of the
  rows carry the unknown-class id ``-1`` (:data:`sdk.classification.UNKNOWN`), and ``-2`` as
  its out-of-range id; every other objective must refuse ``-1``. Ids out
  of range in a training step are tried on CPU only (on CUDA the device asserts; checking
  first would cost a host sync per call).
* **sequence encoders** (``Encoder.sequence``) get token ids ``[B, T]`` and must return
  ``[B, T, out_dim]``; float inputs and ids past the vocabulary are their invalid inputs.
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

from sdk import keys, testing
from sdk.errors import ConfigError, NotFittedError, RequirementError, ShapeError
from sdk.interfaces import (
    Adapter,
    Calibrator,
    Callback,
    DataSampler,
    Detector,
    Encoder,
    Metric,
    Objective,
    Reweighter,
    Sampler,
    Schedule,
    Teacher,
    Transform,
)
from sdk.testing import CLASSES, DIM
from sdk.types import Batch, Loss, Pairs, Views

ERRORS = (ShapeError, RequirementError, ConfigError, NotFittedError)
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
    memo: dict[str, Any] = {}  # what one fuzz computes once (given a fresh dict per fuzz)


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
        batch = batch.evolve(targets=testing.with_unknown(
            obj, torch.randint(0, case.classes, (case.batch,), generator=g), g))
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
            for bad in (c, -2 if obj.accepts_unknown else -1):  # -1: an unknown-class row
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
    if enc.sequence:  # token ids [B, T], T = the case's width
        return _device_inputs(torch.randint(0, enc.out_dim, (case.batch, case.dim), generator=g))
    own = getattr(enc, "example_inputs", None)
    x = own(case.batch, g) if callable(own) else torch.randn(case.batch, enc.in_dim, generator=g)
    if enc.takes_ids:  # ids are not perturbed or cast
        return _device_inputs(x)
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
    want = (*x.shape[:2], enc.out_dim) if enc.sequence else (x.shape[0], enc.out_dim)
    if z.shape != want:
        raise _fail(p, "valid input", f"{case}: output {list(z.shape)}, expected {list(want)}")
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
    ]
    if enc.sequence:  # token ids: floats and ids past the vocabulary (CPU: see the objectives)
        mutations.append(("a float input", x.float()))
        if testing._DEVICE.type == "cpu":
            mutations.append(("a token id past the vocabulary", x.clone().fill_(enc.out_dim)))
    else:
        mutations += [("an input one column too wide", torch.cat([x, x[:, :1]], dim=1)),
                      ("a floating input", x.float()) if enc.takes_ids
                      else ("an integer input", x.long())]
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
def _reweighter_inputs(case: Case, rw: Any = None) -> tuple[Tensor, Batch]:
    """Fuzzed losses and a Batch; a reweighter that gives ``example_inputs`` (one needing
    ``Batch.extras``, e.g. censoring times, or targets that fit the model it reads) has its
    example's extras and targets merged in."""
    g = torch.Generator().manual_seed(case.seed)
    b = case.batch
    per = _pattern(torch.rand(b, 1, generator=g), case.pattern, g)[:, 0]
    batch = Batch(targets=torch.randint(0, case.classes, (b,), generator=g), index=torch.arange(b),
                  domain=torch.arange(b) % 2)
    own = getattr(rw, "example_inputs", None)
    if callable(own):
        example = own(b, g)[1]
        batch = batch.evolve(extras=example.extras, targets=batch.targets if example.targets is None
                             else example.targets)
    return _device_inputs((per.to(case.dtype).requires_grad_(), batch))


def _valid_reweighter(p: _Plugin, case: Case) -> None:
    rw = p.make()
    per, batch = _reweighter_inputs(case, rw)
    loss = _try(p, repr(case), lambda: rw.reduce(Loss(value=per.mean(), per_sample=per), batch),
                refuse=not case.ordinary)
    if loss is None:
        return
    _finite(p, repr(case), "the reduced loss", loss.value)
    _finite_grads(p, repr(case), per, loss.value)


def _invalid_reweighter(p: _Plugin, case: Case, choice: int) -> None:
    rw = p.make()
    per, batch = _reweighter_inputs(case._replace(batch=max(case.batch, 2), dtype=torch.float32), rw)
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
    if cal.inputs not in ("logits", "probabilities"):  # features, regression, similarities
        scores, labels, *_ = cal.example_inputs(n, g)
        return _device_inputs((_pattern(scores.float(), case.pattern, g).to(case.dtype), labels))
    labels = torch.randint(0, c, (n,), generator=g)
    logits = _pattern(3 * torch.nn.functional.one_hot(labels, c) + torch.randn(n, c, generator=g),
                      case.pattern, g).to(case.dtype)
    scores = logits if cal.inputs == "logits" else logits.float().softmax(-1).to(case.dtype)
    return _device_inputs((scores, labels))


def _calibrator_extras(cal: Calibrator, case: Case) -> dict[str, Any]:
    """``fit``'s keyword arguments of ``fit_requires`` (the third of ``example_inputs``)."""
    if not cal.fit_requires:
        return {}
    return _device_inputs(cal.example_inputs(case.batch, torch.Generator().manual_seed(case.seed))[2])


def _valid_calibrator(p: _Plugin, case: Case) -> None:
    cal = p.make()
    scores, labels = _calibrator_inputs(cal, case)
    extras = _calibrator_extras(cal, case)

    def run() -> Tensor:
        cal.fit(scores, labels, **extras)
        return cal(scores)

    out = _try(p, repr(case), run, refuse=not case.ordinary)
    if out is None:
        return
    if cal.inputs not in ("logits", "probabilities"):
        if out.dim() != 2 or out.shape[0] != scores.shape[0]:
            raise _fail(p, "valid input", f"{case}: calibrated {list(out.shape)}, expected "
                        f"[{scores.shape[0]}, K]")
    elif out.shape != scores.shape:
        raise _fail(p, "valid input", f"{case}: calibrated {list(out.shape)}, expected {list(scores.shape)}")
    _finite(p, repr(case), "the calibrated scores", out)


def _invalid_calibrator(p: _Plugin, case: Case, choice: int) -> None:
    cal = p.make()
    case = case._replace(batch=max(case.batch, 2), dtype=torch.float32)
    scores, labels = _calibrator_inputs(cal, case)
    extras = _calibrator_extras(cal, case)
    c = cal.label_classes(scores)
    named = ("scores", cal.inputs)
    mutations = [("labels of another length", ("labels",), scores, labels[:-1], extras),
                 ("scores of rank 1", named, scores[:, 0], labels, extras),
                 ("integer scores", named, scores.long(), labels, extras),
                 ("an empty set", ("empty",), scores[:0], labels[:0], extras)]
    if cal.inputs == "regression":
        mutations.append(("integer targets", ("labels",), scores, labels.long(), extras))
    else:
        mutations += [(f"class id {c} for {c} classes", ("labels",), scores, labels.clone().fill_(c), extras),
                      ("class id -1", ("labels",), scores, labels.clone().fill_(-1), extras),
                      ("float labels", ("labels",), scores, labels.float(), extras)]
    mutations += [(f"no {key}", (key,), scores, labels, {k: v for k, v in extras.items() if k != key})
                  for key in sorted(cal.fit_requires)]
    what, fields, bad_scores, bad_labels, bad_extras = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: cal.fit(bad_scores, bad_labels, **bad_extras))


# metrics -----------------------------------------------------------------------------------------
def _metric_args(metric: Metric, case: Case) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(case.seed)
    args = metric.example_inputs(case.batch, g)
    return _device_inputs(tuple(a.to(case.dtype) if a.is_floating_point() else a for a in args))


def _fits(metric: Metric) -> bool:
    """Whether ``metric`` learns from data before it measures (``fit``, then ``update``: kNN,
    linear probe); ``fit`` takes arguments of the form ``update`` takes."""
    return callable(getattr(metric, "fit", None))


def _metric_fit_args(metric: Metric, case: Case) -> tuple[Tensor, ...]:
    """``fit``'s arguments: example inputs of ``case.batch`` rows (a draw of their own, with
    ``case``'s values)."""
    g = torch.Generator().manual_seed(case.seed + 1)
    args = metric.example_inputs(case.batch, g)
    return _device_inputs(tuple(_pattern(a.float(), case.pattern, g).to(case.dtype)
                                if a.is_floating_point() else a for a in args))


def _valid_metric(p: _Plugin, case: Case) -> None:
    metric = p.make()
    args = _metric_args(metric, case)

    def run() -> Any:
        if _fits(metric):
            metric.fit(*_metric_fit_args(metric, case))
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


def _metric_mutations(args: tuple[Tensor, ...], call: str) -> list[tuple[str, tuple[Tensor, ...]]]:
    """Invalid arguments of ``call`` (``update`` or ``fit``): each argument of another rank,
    integer arguments as floats or holding -1 (class ids), a last argument a row short."""
    out = []
    for i, a in enumerate(args):
        other = a[0] if a.dim() == 2 else a[:, None]
        out.append((f"{call}'s argument {i} of rank {other.dim()}", (*args[:i], other, *args[i + 1:])))
        if not a.is_floating_point():
            out.append((f"{call}'s argument {i} as floats", (*args[:i], a.float(), *args[i + 1:])))
            out.append((f"{call}'s argument {i} holding -1", (*args[:i], a - a - 1, *args[i + 1:])))
    if len(args) > 1:
        out.append((f"{call}'s last argument one row short", (*args[:-1], args[-1][:-1])))
    return out


def _invalid_metric(p: _Plugin, case: Case, choice: int) -> None:
    metric = p.make()
    case = case._replace(batch=max(case.batch, 2), dtype=torch.float32)
    args = _metric_args(metric, case)
    fields = tuple(inspect.signature(metric.update).parameters) + ("scores", "labels")
    fit_args = _metric_fit_args(metric, case) if _fits(metric) else ()

    def fit() -> None:
        if fit_args:
            metric.fit(*fit_args)

    mutations: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = [
        (what, lambda bad=bad: (fit(), metric.update(*bad)), fields)
        for what, bad in _metric_mutations(args, "update")]
    if fit_args:
        fit_fields = tuple(inspect.signature(metric.fit).parameters) + ("labels",)
        mutations += [(what, lambda bad=bad: metric.fit(*bad), fit_fields)
                      for what, bad in _metric_mutations(fit_args, "fit")]
        mutations.append(("update() before fit()", lambda: metric.update(*args), ("fit",)))
    mutations.append(("nan in update's first floating argument", lambda: None, ()))
    if fit_args:
        mutations.append(("nan in fit's first floating argument", lambda: None, ()))
    what, call, fields = mutations[choice % len(mutations)]
    if fields:
        _expect_error(p, what, fields, call)
        return

    def nan(values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        floating = [i for i, a in enumerate(values) if a.is_floating_point()]
        bad = tuple(a.clone() for a in values)
        if floating:
            bad[floating[0]].view(-1)[0] = float("nan")
        return bad

    def poisoned() -> Any:  # a NaN must not be measured as if it were a number
        if fit_args:
            metric.fit(*(nan(fit_args) if "fit's" in what else fit_args))
        metric.update(*(args if "fit's" in what else nan(args)))
        return metric.compute()

    out = _try(p, what, poisoned, refuse=True)
    values = [] if out is None else list(out.values()) if isinstance(out, dict) else [out]
    if values and all(math.isfinite(v) for v in values):
        raise _fail(p, "non-finite input", f"{what}: compute() returned {out!r}; a NaN input must "
                    "give NaN (or a paperplug error), not a number")


# teachers ----------------------------------------------------------------------------------------
STUDENT_IN = 6
"""Input width of the fuzz's student network."""


def _student(case: Case, width: int) -> torch.nn.Module:
    """A small student (a linear layer and a batch norm, so it has buffers) of output ``width``."""
    torch.manual_seed(case.seed)
    net = torch.nn.Sequential(torch.nn.Linear(STUDENT_IN, width), torch.nn.BatchNorm1d(width)).eval()
    return (net.double() if case.dtype == torch.float64 else net).to(testing._DEVICE)


def _teacher_inputs(teacher: Any, case: Case, step: int, student: torch.nn.Module
                    ) -> tuple[Views, Batch, Tensor]:
    """One micro-batch as the engine gives a teacher: the student's views (patterned values),
    the teacher's outputs per view when it encodes them, and a Batch with this step's indices."""
    g = torch.Generator().manual_seed(case.seed + step)
    b, dtype = case.batch, case.dtype
    x = torch.randn(b, STUDENT_IN, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = _device_inputs(x)
    width = max(case.dim, 1)
    embeddings = tuple(_device_inputs(_leaf(torch.randn(b, width, generator=g).requires_grad_(), case, g))
                       for _ in range(max(case.views, 1)))
    extras: dict[str, Any] = {}
    if teacher.encodes_views:
        with torch.autocast(testing._DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            extras[keys.TEACHER] = tuple(teacher(x) for _ in embeddings)
    batch = Batch(targets=torch.randint(0, max(case.classes, 1), (b,), generator=g),
                  index=torch.randperm(b, generator=g) + step * b)
    return Views(embeddings=embeddings, extras=extras), _device_inputs(batch), x


def _feed(teacher: Any, views: Views, batch: Batch, step: int, student: Any) -> None:
    """What the engine does after a micro-batch's backward and the optimizer step."""
    if teacher.observes:
        teacher.observe(views=views, batch=batch, step=step, max_steps=10)
        teacher.update(student=student, views=None, batch=None, step=step, max_steps=10)
    else:
        teacher.update(student=student, views=views, batch=batch, step=step, max_steps=10)


def _teacher_outputs(teacher: Any, x: Tensor) -> list[tuple[str, Tensor]]:
    """Everything a teacher gives the objective, and its state: ``(name, tensor)``."""
    out = [(f"memory()[{k!r}]", v) for k, v in teacher.memory().items() if isinstance(v, Tensor)]
    out += [(f"state_dict()[{k!r}]", v) for k, v in teacher.state_dict().items() if isinstance(v, Tensor)]
    if teacher.encodes_views:
        out.append(("teacher(x)", teacher(x)))
    return [(n, t) for n, t in out if t.is_floating_point()]


def _valid_teacher(p: _Plugin, case: Case) -> None:
    teacher = p.make()
    student = _student(case, max(case.dim, 1))

    def run() -> Tensor:
        teacher.attach(student)
        for step in range(2):  # two steps: the second meets the state the first left
            views, batch, x = _teacher_inputs(teacher, case, step, student)
            _feed(teacher, views, batch, step, student)
        return x

    x = _try(p, repr(case), run, refuse=not case.ordinary)
    if x is None:
        return
    memory = teacher.memory()
    unknown = set(memory) - set(teacher.memory_keys)
    if unknown:
        raise _fail(p, "valid input", f"{case}: memory() publishes {sorted(unknown)}, not declared in "
                    f"memory_keys {teacher.memory_keys}")
    for name, t in _teacher_outputs(teacher, x):
        _finite(p, repr(case), name, t)
    if teacher.encodes_views:
        out = teacher(x)
        if out.shape[0] != x.shape[0]:
            raise _fail(p, "valid input", f"{case}: teacher(x) has {out.shape[0]} rows for {x.shape[0]}")


def _invalid_teacher(p: _Plugin, case: Case, choice: int) -> None:
    case = case._replace(batch=max(case.batch, 2), dtype=torch.float32)
    teacher = p.make()
    student = _student(case, max(case.dim, 1))
    cpu = testing._DEVICE.type == "cpu"
    b = case.batch

    def warm() -> tuple[Views, Batch, Tensor]:  # attached, with the state of one step
        teacher.attach(student)
        views, batch, x = _teacher_inputs(teacher, case, 0, student)
        _feed(teacher, views, batch, 0, student)
        return _teacher_inputs(teacher, case, 1, student)

    def feeding(change: Callable[[Views, Batch], tuple[Views, Batch]]) -> Callable[[], None]:
        def call() -> None:
            views, batch, _ = warm()
            _feed(teacher, *change(views, batch), 1, student)
        return call

    def ints(views: Views) -> Views:
        return views.evolve(embeddings=tuple(torch.ones(z.shape, dtype=torch.long, device=z.device)
                                             for z in views.embeddings))

    def index(batch: Batch, value: int) -> Batch:
        t = batch.index.clone()
        t[0] = value
        return batch.evolve(index=t)

    def other_student() -> None:
        views, batch, _ = warm()
        _feed(teacher, views, batch, 1, _student(case, max(case.dim, 1) + 1))

    def unattached() -> None:  # a fresh teacher, never attached
        if teacher.encodes_views:
            teacher(_device_inputs(torch.randn(b, STUDENT_IN)))
        else:
            _feed(teacher, *_teacher_inputs(teacher, case, 0, student)[:2], 0, student)

    mutations: list[tuple[str, tuple[str, ...], Callable[[], None]]] = [
        (f"a Batch.index of {b + 1} rows for {b} samples", ("index",),
         feeding(lambda v, bt: (v, bt.evolve(targets=None, index=torch.arange(b + 1).to(bt.index))))),
        ("integer embeddings", ("embeddings",), feeding(lambda v, bt: (ints(v), bt))),
        ("an empty batch", ("empty",), feeding(lambda v, bt: _rows((v, bt), b, 0))),
        ("no Batch.index", ("index",), feeding(lambda v, bt: (v, bt.evolve(index=None)))),
        ("update() without a student", ("student",),
         lambda: (warm(), teacher.update(student=None, views=None, batch=None, step=1, max_steps=10))),
        ("a student of another architecture", ("student",), other_student),
        ("used before attach()", ("attach", "student"), unattached),
    ]
    if cpu:
        mutations += [("index -1", ("index",), feeding(lambda v, bt: (v, index(bt, -1)))),
                      ("index 10**9", ("index",), feeding(lambda v, bt: (v, index(bt, 10**9))))]
    mutations.append(("nan in the views and the student", (), lambda: None))
    what, fields, call = mutations[choice % len(mutations)]
    if fields:
        _expect_error(p, what, fields, call, strict=False)
        return
    # non-finite: what the teacher reads (views, the student's weights) is NaN in one entry; it
    # must show in what it gives the objective or keeps (memory, state, outputs), not be hidden
    def poisoned() -> Tensor:
        views, batch, x = warm()
        with torch.no_grad():
            next(student.parameters()).view(-1)[0] = float("nan")
        _feed(teacher, *_with_value((views, batch), float("nan")), 1, student)
        return x

    x = _try(p, what, poisoned, refuse=True)
    if x is None:
        return
    outputs = _teacher_outputs(teacher, x)
    if outputs and all(torch.isfinite(t.detach().float()).all() for _, t in outputs):
        raise _fail(p, "non-finite input", f"{what}: the teacher's memory, state and outputs are all "
                    "finite; a NaN it read must show there (or raise a paperplug error)")


# schedules ---------------------------------------------------------------------------------------
class Progress(NamedTuple):
    """A schedule's input: ``step`` of ``max_steps`` (None: a run of unknown length)."""

    step: int
    max_steps: int | None

    @property
    def ordinary(self) -> bool:
        return self.max_steps is not None and 0 <= self.step <= self.max_steps


def _valid_schedule(p: _Plugin, case: Progress) -> None:
    schedule = p.make()
    value = _try(p, repr(case), lambda: schedule(case.step, case.max_steps), refuse=not case.ordinary)
    if value is None:
        return
    if not isinstance(value, float) or not math.isfinite(value):
        raise _fail(p, "valid input", f"{case}: returned {value!r}, expected a finite float")
    again = p.make()
    again.load_state_dict(schedule.state_dict())
    if again(case.step, case.max_steps) != value:
        raise _fail(p, "valid input", f"{case}: a schedule restored from its state_dict gives another value")


def _invalid_schedule(p: _Plugin, case: Progress, choice: int) -> None:
    schedule = p.make()
    top = case.max_steps or 10
    mutations = [(f"step {-1 - case.step % 7}", ("step",), True, -1 - case.step % 7, top),
                 ("max_steps 0", ("max_steps",), False, min(case.step, 5), 0),
                 (f"max_steps {-top}", ("max_steps",), True, 0, -top),
                 ("a float step", ("step",), False, 0.5, top)]
    what, fields, strict, step, max_steps = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: schedule(step, max_steps), strict=strict)


# what the Trainer drives (data samplers, callbacks) ----------------------------------------------
DATASET_SIZES = (0, 1, 2, 3, 5, 13, 64, 257, 2048)
ORDINARY_DATASET = 2048
"""A data sampler's ordinary dataset: large enough for the defaults of the built-in ones."""


class _SquaredNorm(Objective):
    """The stand-in objective of trainer-driven fuzzing: the mean squared norm of one view."""

    requires = {"views": 1}
    batch_coupled = False

    def forward(self, views: Views, batch: Batch) -> Loss:
        per = views.embeddings[0].float().pow(2).sum(1)
        return Loss(value=per.mean(), per_sample=per)


class _TinyEncoder(Encoder):
    """A linear backbone and a linear head (so ``features`` differ from the output)."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.out_dim = width
        self.backbone = torch.nn.Linear(in_dim, width)
        self.head = torch.nn.Linear(width, width)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _dataset(case: Case, n: int, bad: float | None = None) -> Any:
    """``n`` rows ``(x [6], class id, index)`` with ``case``'s values (``bad``: in row 0)."""
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(n, STUDENT_IN, generator=g)
    x = _pattern(x, case.pattern, g) if n else x
    if bad is not None and n:
        x[0, 0] = bad
    x = x.to(torch.float64 if case.dtype == torch.float64 else torch.float32)
    rows = torch.arange(n)
    return torch.utils.data.TensorDataset(x, rows % max(case.classes, 1), rows)


def _fit(case: Case, dataset: Any, *, sampler: Any = None, callbacks: tuple[Any, ...] = (),
         accumulate: int = 1, batch_size: int | None = None) -> Any:
    """A two-step ``Trainer.fit`` of a tiny encoder on ``dataset`` with the plugin under test
    (bfloat16: ``bf16-mixed``; float64: a float64 encoder), dropping non-finite updates
    (``on_nonfinite="skip"``: a plugin must come through a run fed NaN or inf data). A
    callback that reads unlabelled data gets ``dataset`` as the unlabelled loader too."""
    from sdk.engine import Trainer

    torch.manual_seed(case.seed)
    enc = _TinyEncoder(STUDENT_IN, max(case.dim, 1))
    if case.dtype == torch.float64:
        enc = enc.double()
    trainer = Trainer(enc, _SquaredNorm(), sampler=sampler, callbacks=list(callbacks), max_steps=2,
                      accumulate=accumulate, progress=False, device=str(testing._DEVICE),
                      on_nonfinite="skip",
                      precision="bf16-mixed" if case.dtype == torch.bfloat16 else "32", seed=case.seed)
    size = batch_size or max(case.views, 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=size)
    reads = any(isinstance(c, Callback) and c.reads_unlabeled for c in callbacks)
    return trainer.fit(loader, unlabeled=loader if reads else None)


def _run(p: _Plugin, what: str, call: Callable[[], Any], *, refuse: bool) -> Any:
    """:func:`_try` for a call through the Trainer: a :class:`sdk.PluginFailure` (the plugin
    raised something other than a paperplug error) fails the fuzz with its cause."""
    from sdk.errors import PluginFailure

    try:
        return _try(p, what, call, refuse=refuse)
    except AssertionError as exc:
        if isinstance(exc.__cause__, PluginFailure):
            cause = exc.__cause__.__cause__
            raise _fail(p, "valid input", f"{what} raised {type(cause).__name__}: {cause}; "
                        "expected a result or a paperplug error") from cause
        raise


# data samplers -----------------------------------------------------------------------------------
def _sampler_batch(sampler: Any) -> int | None:
    """The batch size a data sampler forms batches of (its ``batch_size``), else None."""
    size = getattr(sampler, "batch_size", None)
    return size if isinstance(size, int) else None


def _check_order(p: _Plugin, what: str, sampler: Any, n: int) -> None:
    order = list(sampler)
    if not all(isinstance(i, int) and 0 <= i < n for i in order):
        bad = next(i for i in order if not (isinstance(i, int) and 0 <= i < n))
        raise _fail(p, "valid input", f"{what}: the order holds {bad!r}, not a position of the "
                    f"{n} samples")
    if len(sampler) != len(order):
        raise _fail(p, "valid input", f"{what}: len() is {len(sampler)} but it yields {len(order)}")


def _valid_data_sampler(p: _Plugin, case: Case) -> None:
    sampler = p.make()
    n = case.batch
    dataset = _dataset(case, n)
    if n == 0:  # nothing to train on: bind and the order only
        def bound() -> Any:
            sampler.bind(dataset)
            sampler.set_epoch(0)
            return list(sampler)

        order = _try(p, repr(case), bound, refuse=True)
        if order:
            raise _fail(p, "valid input", f"{case}: an empty dataset gave the order {order[:5]}")
        return
    trainer = _run(p, repr(case), lambda: _fit(case, dataset, sampler=sampler,
                                               batch_size=_sampler_batch(sampler)),
                   refuse=not case.ordinary)
    if trainer is None:
        return
    _check_order(p, repr(case), sampler, n)


def _invalid_data_sampler(p: _Plugin, case: Case, choice: int) -> None:
    case = case._replace(batch=max(case.batch, 2))
    n = case.batch
    size = _sampler_batch(p.make())
    mutations = ["restored from a run on more samples", "nan in the data", "inf in the data"]
    what = mutations[choice % len(mutations)]
    if what.startswith("restored"):
        big = p.memo.get("big")
        if big is None:  # one run on the ordinary dataset per fuzz
            big = p.memo["big"] = p.make()
            if _run(p, what, lambda: _fit(case._replace(batch=ORDINARY_DATASET),
                                          _dataset(case, ORDINARY_DATASET), sampler=big, batch_size=size),
                    refuse=True) is None:
                p.memo["big"] = False
        if big is False:
            return
        small = p.make()
        if _try(p, what, lambda: small.bind(_dataset(case, n)) or True, refuse=True) is None:
            return  # a dataset it cannot take, refused by bind

        def restore() -> None:
            small.load_state_dict(big.state_dict())
            small.set_epoch(0)
            _check_order(p, what, small, n)

        _expect_error(p, what, ("dataset", "state", "checkpoint", "checkpointed", "num_samples"),
                      restore, strict=False)
        return
    sampler = p.make()  # a non-finite sample: a paperplug error or an order of the dataset's positions
    bad = float("nan") if what.startswith("nan") else float("inf")
    trainer = _run(p, what, lambda: _fit(case, _dataset(case, n, bad), sampler=sampler, batch_size=size),
                   refuse=True)
    if trainer is not None:
        _check_order(p, what, sampler, n)


# callbacks ---------------------------------------------------------------------------------------
def _valid_callback(p: _Plugin, case: Case) -> None:
    callback = p.make()
    dataset = _dataset(case, 2 * case.batch)
    trainer = _run(p, repr(case), lambda: _fit(case, dataset, callbacks=(callback,), batch_size=case.batch),
                   refuse=not case.ordinary)
    if trainer is None:
        return
    for name, q in trainer.encoder.named_parameters():
        _finite(p, repr(case), f"the encoder's {name} after the run", q)


def _invalid_callback(p: _Plugin, case: Case, choice: int) -> None:
    case = case._replace(batch=max(case.batch, 2), dtype=torch.float32)
    mutations = [("accumulate=2", ("accumulate",), None), ("nan in the data", (), float("nan")),
                 ("inf in the data", (), float("inf"))]
    what, fields, bad = mutations[choice % len(mutations)]
    dataset = _dataset(case, 4 * case.batch, bad)
    call = lambda: _fit(case, dataset, callbacks=(p.make(),), batch_size=case.batch,  # noqa: E731
                        accumulate=2 if fields else 1)
    if fields:
        from sdk.errors import PluginFailure

        try:
            _expect_error(p, what, fields, call, strict=False)
        except AssertionError as exc:
            if isinstance(exc.__cause__, PluginFailure):
                raise _fail(p, "invalid input", f"{what}: {exc.__cause__}") from exc
            raise
        return
    _run(p, what, call, refuse=True)  # whatever the values, no error from inside the callback


# detectors ---------------------------------------------------------------------------------------
def _detector_inputs(det: Detector, case: Case) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    n, c = case.batch, max(case.classes, 1)
    labels = torch.randint(0, c, (n,), generator=g)
    width = max(case.dim, 1) if det.inputs == "features" else c
    own = getattr(det, "example_inputs", None)
    if callable(own) and det.inputs != "features":  # scores of its own width (e.g. several heads)
        width = own(2, torch.Generator().manual_seed(case.seed))[0].shape[1]
    x = _pattern(torch.randn(n, width, generator=g), case.pattern, g)
    if det.inputs == "probabilities":
        x = x.softmax(-1)
    return _device_inputs((x.to(case.dtype), labels))


def _valid_detector(p: _Plugin, case: Case) -> None:
    det = p.make()
    x, labels = _detector_inputs(det, case)

    def run() -> Tensor:
        det.fit(x, labels if det.needs_labels else None)
        return det.score(x)

    scores = _try(p, repr(case), run, refuse=not case.ordinary)
    if scores is not None:
        _finite(p, repr(case), "the scores", scores)


def _invalid_detector(p: _Plugin, case: Case, choice: int) -> None:
    det = p.make()
    x, labels = _detector_inputs(det, case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    fitted = lambda: det.fit(x, labels)  # noqa: E731
    mutations = [("x of rank 1", ("x", det.inputs), lambda: det.fit(x[0], None)),
                 ("integer x", ("x", det.inputs), lambda: det.fit(x.long(), labels)),
                 ("labels of another length", ("labels",), lambda: det.fit(x, labels[:-1])),
                 ("float labels", ("labels",), lambda: det.fit(x, labels.float())),
                 ("scores of one more column than fitted", ("width", "x", det.inputs),
                  lambda: (fitted(), det.score(torch.cat([x, x[:, :1]], 1)))),
                 ("an empty set", ("empty", "update"), lambda: det.fit(x[:0], labels[:0]))]
    what, fields, call = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, call, strict=what != "an empty set")


# adapters ----------------------------------------------------------------------------------------
def _adapter_inputs(case: Case) -> tuple[torch.nn.Module, Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    width, c = max(case.dim, 1), max(case.classes, 1)
    model = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, c))
    for _ in range(2):
        model(torch.randn(32, width, generator=g))
    model = model.eval().to(torch.float64 if case.dtype == torch.float64 else torch.float32)
    x = _pattern(torch.randn(case.batch, width, generator=g), case.pattern, g)
    return _device_inputs((model, x.to(next(model.parameters()).dtype)))


def _valid_adapter(p: _Plugin, case: Case) -> None:
    adapter = p.make()
    model, x = _adapter_inputs(case)
    model = model.to(testing._DEVICE)
    with torch.autocast(testing._DEVICE.type, dtype=torch.bfloat16, enabled=case.dtype == torch.bfloat16):
        out = _try(p, repr(case), lambda: adapter.adapt(model, x), refuse=not case.ordinary)
    if out is None:
        return
    _finite(p, repr(case), "the adapted outputs", out)
    adapter.reset()
    for name, q in model.state_dict().items():
        _finite(p, repr(case), f"the model's {name} after reset()", q)


def _invalid_adapter(p: _Plugin, case: Case, choice: int) -> None:
    adapter = p.make()
    model, x = _adapter_inputs(case._replace(batch=max(case.batch, 2), dtype=torch.float32))
    model = model.to(testing._DEVICE)
    b = x.shape[0]
    mutations = [("x without a batch dimension", ("x",), x[0, 0], None),
                 ("an empty batch", ("empty",), x[:0], None),
                 (f"a Batch of {b + 1} rows for {b} samples", ("Batch", "batch"), x,
                  _device_inputs(Batch(index=torch.arange(b + 1))))]
    what, fields, bad_x, batch = mutations[choice % len(mutations)]
    _expect_error(p, what, fields, lambda: adapter.adapt(model, bad_x, batch))


# driver ------------------------------------------------------------------------------------------
class _Kind(NamedTuple):
    """How one interface is fuzzed: the checks of a valid and of an invalid input, the strategy
    of valid inputs, the inputs always tried (ordinary ones, which must not be refused), and
    ``cost(plugin)``: examples drawn are ``max_examples // cost`` (at least 3), for kinds whose
    every example runs a Trainer or fits a model."""

    valid: Callable[[_Plugin, Any], None]
    invalid: Callable[[_Plugin, Any, int], None]
    cases: Callable[[Any], Any]
    ordinary: Callable[[Any], list[Any]]
    cost: Callable[[Any], int] = lambda _: 1


def _views_of(plugin: Any) -> tuple[Any, int]:
    """The views an objective is fed (a strategy, and the ordinary count); others: 2-4 and 2."""
    from hypothesis import strategies as st

    if isinstance(plugin, Objective):
        need = int(plugin.requires.get("views", 0))
        if need:
            return st.integers(need, max(need, 4)), max(2, need)
        if plugin.requires.get("logits"):
            return st.just(0), 0
    return st.integers(2, 4), 2


def _tensor_cases(plugin: Any, sizes: tuple[int, ...] = BATCH_SIZES) -> Any:
    from hypothesis import strategies as st

    return st.builds(Case, batch=st.sampled_from(sizes), views=_views_of(plugin)[0],
                     dim=st.integers(1, 24), classes=st.integers(1, 7), dtype=st.sampled_from(DTYPES),
                     pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16))


def _ordinary(plugin: Any, batch: int = 8) -> list[Case]:
    return [Case(batch, _views_of(plugin)[1], DIM, CLASSES, dtype, "gaussian", 0) for dtype in DTYPES]


def _progress_cases(plugin: Any) -> Any:
    from hypothesis import strategies as st

    top = st.one_of(st.none(), st.integers(1, 10**6))
    return st.builds(Progress, step=st.one_of(st.integers(0, 20), st.integers(0, 2 * 10**6)), max_steps=top)


_TENSORS = (_tensor_cases, _ordinary)
_KINDS: tuple[tuple[type, _Kind], ...] = (
    (Objective, _Kind(_valid_objective, _invalid_objective, *_TENSORS)),
    (Sampler, _Kind(_valid_sampler, _invalid_sampler, *_TENSORS)),
    (Encoder, _Kind(_valid_encoder, _invalid_encoder, *_TENSORS)),
    (Transform, _Kind(_valid_transform, _invalid_transform, *_TENSORS)),
    (Reweighter, _Kind(_valid_reweighter, _invalid_reweighter, *_TENSORS)),
    (Calibrator, _Kind(_valid_calibrator, _invalid_calibrator, *_TENSORS)),
    (Metric, _Kind(_valid_metric, _invalid_metric, *_TENSORS, cost=lambda m: 3 if _fits(m) else 1)),
    (Teacher, _Kind(_valid_teacher, _invalid_teacher, *_TENSORS)),
    (Detector, _Kind(_valid_detector, _invalid_detector, *_TENSORS)),
    (Adapter, _Kind(_valid_adapter, _invalid_adapter, *_TENSORS)),
    (Schedule, _Kind(_valid_schedule, _invalid_schedule, _progress_cases,
                     lambda _: [Progress(0, 100), Progress(50, 100), Progress(100, 100)])),
    (DataSampler, _Kind(_valid_data_sampler, _invalid_data_sampler,
                        lambda p: _tensor_cases(p, DATASET_SIZES),
                        lambda p: _ordinary(p, ORDINARY_DATASET)[:1], cost=lambda _: 3)),
    (Callback, _Kind(_valid_callback, _invalid_callback, *_TENSORS, cost=lambda _: 3)),
)
FUZZED_INTERFACES: tuple[type, ...] = tuple(base for base, _ in _KINDS)
"""The interfaces :func:`fuzz_plugin` has inputs for (every one in :mod:`sdk.interfaces`)."""


def _kind_of(plugin: Any) -> _Kind | None:
    return next((k for base, k in _KINDS if isinstance(plugin, base)), None)


def fuzzable(plugin: Any) -> bool:
    """Whether :func:`fuzz_plugin` has inputs for ``plugin``: it implements an interface of
    :data:`FUZZED_INTERFACES`, and a metric gives ``example_inputs(batch_size, generator)``
    (``update``'s arguments, and ``fit``'s for a metric that fits first). An experiment
    tracker (:class:`sdk.tracking.Tracker`) is not fuzzed: it reads no batch, only the run's
    records, and writes to a tracker's store; its tests read that store back."""
    from sdk.tracking import Tracker

    if isinstance(plugin, Tracker):
        return False
    if isinstance(plugin, Metric):
        return callable(getattr(plugin, "example_inputs", None))
    return _kind_of(plugin) is not None


def fuzz_plugin(kind: str, name: str, *, max_examples: int = 30, registry: Any = None,
                device: str | torch.device = "cpu", **params: Any) -> int:
    """Fuzz plugin ``name`` of ``kind`` (built with ``params``): ``max_examples`` drawn valid
    inputs and as many invalid ones (see the module docstring; a third of that where every
    example runs a Trainer or fits a model: data samplers, callbacks, metrics with ``fit``).
    Returns the number of
    examples run, 0 for a plugin without fuzzed inputs (:func:`fuzzable`: a metric without
    ``example_inputs``, or an object of no sdk interface).
    Failures raise ``AssertionError`` naming the plugin, the input and what went wrong.

    Needs hypothesis (``pip install paperplug[test]``), imported here rather than by ``sdk``.
    """
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from sdk.registry import get_registry

    testing._DEVICE = torch.device(device)
    reg = registry if registry is not None else get_registry()

    make = testing.fresh_copies(lambda: reg.create(kind, name, **params), testing._DEVICE)
    plugin = make()
    spec = _kind_of(plugin)
    if spec is None or not fuzzable(plugin):
        return 0
    p = _Plugin(f"{kind} {name}", (name, type(plugin).__name__), make, {})
    count = max(3, max_examples // spec.cost(plugin)) if max_examples else 0
    runs = [0]
    config = settings(max_examples=count, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), print_blob=False,
                      report_multiple_bugs=False)
    cases = spec.cases(plugin)

    def valid_property(case: Any) -> None:
        runs[0] += 1
        spec.valid(p, case)

    def invalid_property(case: Any, choice: int) -> None:
        runs[0] += 1
        spec.invalid(p, case, choice)

    for case in spec.ordinary(plugin):  # always tried, whatever hypothesis draws
        valid_property = example(case)(valid_property)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention
    try:
        config(given(cases)(valid_property))()
        config(given(cases, st.integers(0, 63))(invalid_property))()
    finally:
        torch.set_num_threads(threads)
    return runs[0]
