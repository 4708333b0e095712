"""Conformance kit: checks a plugin author runs on their own plugin (and our suite runs on all).

``check_plugin(kind, name, **params)`` builds the plugin through the registry, feeds it
synthetic inputs (or the plugin's own ``example_inputs(batch_size, generator)``) and asserts:
the card is complete, outputs have the documented form, gradients reach every input that
requires grad, bfloat16 inputs work, bad inputs raise clear errors, and ``state_dict``
round-trips; then it fuzzes the plugin's inputs (:mod:`sdk.fuzz`, hypothesis). Failures raise
``AssertionError`` naming the plugin and the check.

``check_distributed(cases)`` runs batch-coupled objectives in 2 gloo processes and asserts that
they give the loss and gradients of one process on the concatenated batch.

``check_resume(objective=..., teacher=..., sampler=..., reweighter=..., tmp_dir=...)`` trains a
tiny model with stateful plugins through :class:`sdk.Trainer` three times (straight; killed after
a checkpoint; resumed) and asserts the resumed run ends bitwise equal to the straight one.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sdk.errors import NotFittedError, RequirementError, ShapeError
from sdk.events import State
from sdk.interfaces import (
    Adapter,
    Calibrator,
    Callback,
    Detector,
    Encoder,
    Input,
    Metric,
    Objective,
    Reweighter,
    Sampler,
    Schedule,
    Teacher,
    Transform,
)
from sdk.registry import get_registry
from sdk.types import Batch, Logits, Loss, Pairs, Probabilities, Views

BATCH, DIM, CLASSES = 8, 16, 5


def _fail(plugin: str, check: str, detail: str) -> AssertionError:
    return AssertionError(f"[{plugin}] {check}: {detail}")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (Views, Batch)):
        found = []
        for field in ("embeddings", "logits", "targets", "index", "domain", "weight"):
            if hasattr(obj, field):
                found += _tensors(getattr(obj, field))
        return found + _tensors(dict(obj.extras))
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _map(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Copy of ``obj`` (records, tuples, dicts) with ``fn`` applied to every tensor."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Views):
        return Views(embeddings=tuple(_map(z, fn) for z in obj.embeddings),
                     logits=_map(obj.logits, fn), extras=_map(dict(obj.extras), fn))
    if isinstance(obj, Batch):
        return Batch(**{f: _map(getattr(obj, f), fn) for f in ("targets", "index", "domain", "weight")},
                     extras=_map(dict(obj.extras), fn))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors cast to ``dtype``, as new leaves keeping ``requires_grad``."""
    return _map(obj, lambda t: t.detach().to(dtype).requires_grad_(t.requires_grad)
                if t.is_floating_point() else t)


def _to(obj: Any, device: torch.device) -> Any:
    """Tensors moved to ``device``, as new leaves keeping ``requires_grad``."""
    return _map(obj, lambda t: t.detach().to(device).requires_grad_(t.requires_grad)
                if t.is_floating_point() else t.to(device))


# synthetic inputs ---------------------------------------------------------------------------
def objective_inputs(obj: Objective, g: torch.Generator, batch_size: int = BATCH, *,
                     n_views: int | None = None, dim: int = DIM,
                     classes: int = CLASSES) -> tuple[Views, Batch]:
    """Synthetic ``(views, batch)`` for what ``obj`` requires: ``n_views`` (default: as many as
    it requires, else 2 unless it takes only logits) Gaussian ``[batch_size, dim]`` embeddings,
    logits ``[batch_size, classes]``, class ids ``i % classes`` (every fourth row
    :data:`sdk.classification.UNKNOWN` for an objective declaring ``accepts_unknown``) and the
    other fields it needs."""
    req = obj.requires
    b = batch_size
    if n_views is None:
        n_views = int(req.get("views", 0)) or (0 if req.get("logits") else 2)
    embeddings = tuple(torch.randn(b, dim, generator=g).requires_grad_() for _ in range(n_views))
    logits = torch.randn(b, classes, generator=g).requires_grad_() if req.get("logits") else None
    views = Views(embeddings=embeddings, logits=logits)
    batch = Batch(
        targets=with_unknown(obj, torch.arange(b) % classes),
        index=torch.randperm(b, generator=g),
        domain=torch.arange(b) % 2 if req.get("domain") else None,
        weight=torch.rand(b, generator=g) + 0.5 if req.get("weight") else None,
    )
    return views, batch


def with_unknown(obj: Objective, targets: Tensor, g: torch.Generator | None = None) -> Tensor:
    """``targets`` (class ids ``[B]``) with some rows set to :data:`sdk.classification.UNKNOWN`
    when ``obj`` declares ``accepts_unknown``: each row with probability 1/4 drawn from ``g``,
    or every fourth row (3, 7, ...) without ``g``; unchanged for any other objective."""
    if not obj.accepts_unknown or targets.dim() != 1:
        return targets
    from sdk.classification import UNKNOWN

    b = targets.shape[0]
    rows = (torch.rand(b, generator=g) < 0.25 if g is not None else torch.arange(b) % 4 == 3)
    return targets.masked_fill(rows.to(targets.device), UNKNOWN)


def detector_inputs(detector: Detector, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_in, labels, x_test_in, x_out)`` for a detector of what its ``inputs`` declares:
    features of ``CLASSES`` Gaussian clusters (in-distribution, 64 rows to fit on and 32 to
    score) and 32 rows far from every cluster (out-of-distribution); logits peaked on the class
    (in) or nearly flat (out), and their softmax for probabilities."""
    n_fit, n_test = 64, 32
    labels = torch.arange(n_fit + n_test) % CLASSES
    if detector.inputs == "features":
        means = 4 * torch.randn(CLASSES, DIM, generator=g)
        x = means[labels] + torch.randn(n_fit + n_test, DIM, generator=g)
        out = 4 * torch.randn(n_test, DIM, generator=g) + 12
    else:
        x = 4 * torch.nn.functional.one_hot(labels, CLASSES) + torch.randn(n_fit + n_test, CLASSES,
                                                                            generator=g)
        out = 0.3 * torch.randn(n_test, CLASSES, generator=g)
        if detector.inputs == "probabilities":
            x, out = x.softmax(-1), out.softmax(-1)
    return x[:n_fit], labels[:n_fit], x[n_fit:], out


def _default_inputs(plugin: Any, g: torch.Generator) -> Any:
    if isinstance(plugin, Objective):
        return objective_inputs(plugin, g)
    if isinstance(plugin, Sampler):
        return (Views(embeddings=(torch.randn(BATCH, DIM, generator=g),
                                  torch.randn(BATCH, DIM, generator=g))),
                Batch(targets=torch.arange(BATCH) % CLASSES, index=torch.arange(BATCH)))
    if isinstance(plugin, Encoder) and plugin.sequence:  # token ids [B, T]
        return torch.randint(0, plugin.out_dim, (BATCH, 12), generator=g)
    if isinstance(plugin, Encoder):
        in_dim = getattr(plugin, "in_dim", None)
        if in_dim is None:
            raise _fail(type(plugin).__name__, "inputs",
                        "encoder has no in_dim attribute; define example_inputs()")
        return torch.randn(BATCH, in_dim, generator=g)
    if isinstance(plugin, Calibrator):
        if plugin.inputs not in ("logits", "probabilities"):
            raise _fail(type(plugin).__name__, "inputs",
                        f"a calibrator of {plugin.inputs} defines example_inputs()")
        labels = torch.arange(64) % CLASSES
        logits = 3 * torch.nn.functional.one_hot(labels, CLASSES) + torch.randn(64, CLASSES, generator=g)
        return (logits if plugin.inputs == "logits" else logits.softmax(-1)), labels
    if isinstance(plugin, Reweighter):
        return (torch.rand(BATCH, generator=g).requires_grad_(),
                Batch(targets=torch.arange(BATCH) % CLASSES, index=torch.arange(BATCH),
                      domain=torch.arange(BATCH) % 2))
    if isinstance(plugin, Detector):
        return detector_inputs(plugin, g)
    if isinstance(plugin, Adapter):
        model = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, CLASSES))
        for _ in range(3):  # running statistics of some training data, then evaluation mode
            model(torch.randn(4 * BATCH, DIM, generator=g))
        return model.eval(), torch.randn(BATCH, DIM, generator=g) + 0.5
    if isinstance(plugin, Transform):
        return (torch.randn(BATCH, DIM, generator=g),
                Batch(targets=torch.arange(BATCH) % CLASSES, index=torch.arange(BATCH)))
    return None


_DEVICE = torch.device("cpu")


def example_inputs(plugin: Any, seed: int = 0) -> Any:
    """The plugin's own ``example_inputs(batch_size, generator)`` or synthetic ones, on the
    device being checked."""
    g = _gen(seed)
    own = getattr(plugin, "example_inputs", None)
    return _to(own(BATCH, g) if callable(own) else _default_inputs(plugin, g), _DEVICE)


# checks -------------------------------------------------------------------------------------
def check_card(card: Any, *, builtin: bool = True) -> None:
    missing = card.missing_fields() if builtin else []
    if missing:
        raise _fail(card.name, "card", f"empty fields {missing}")
    if not card.summary.strip() or not card.title.strip():
        raise _fail(card.name, "card", "title and summary must be non-empty")


def _check_grads(name: str, inputs: Any, output: Tensor) -> None:
    leaves = [t for t in _tensors(inputs) if t.requires_grad]
    if not leaves:
        return
    grads = torch.autograd.grad(output, leaves, allow_unused=True)
    for i, (leaf, grad) in enumerate(zip(leaves, grads)):
        if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
            raise _fail(name, "gradient", f"input #{i} of shape {list(leaf.shape)} receives "
                        f"{'no' if grad is None else 'a zero or non-finite'} gradient")


def _check_objective(name: str, make: Callable[[], Any]) -> None:
    obj = make()
    views, batch = example_inputs(obj)
    loss = obj(views, batch)
    if not isinstance(loss, Loss):
        raise _fail(name, "output", f"returned {type(loss).__name__}, expected Loss")
    if not torch.isfinite(loss.value):
        raise _fail(name, "output", f"loss is not finite: {loss.value}")
    if loss.per_sample is not None and loss.per_sample.shape != (views.batch_size,):
        raise _fail(name, "per_sample", f"shape {list(loss.per_sample.shape)}, expected "
                    f"[{views.batch_size}]")
    for key, value in loss.logs.items():
        if isinstance(value, Tensor) and value.requires_grad:
            raise _fail(name, "logs", f"logs[{key!r}] must be detached")
    if not isinstance(obj.batch_coupled, bool):
        raise _fail(name, "declaration", "batch_coupled must be declared True (the loss couples the "
                    "samples of a batch) or False (per-sample)")
    _check_grads(name, (views, batch), loss.value)

    low = make()
    low.load_state_dict(obj.state_dict())
    low_views, low_batch = _cast((views, batch), torch.bfloat16)
    value = low(low_views, low_batch).value
    if not torch.isfinite(value.float()):
        raise _fail(name, "bfloat16", f"loss is not finite with bf16 inputs: {value}")

    need = int(obj.requires.get("views", 0))
    if need >= 1:
        fewer = views.evolve(embeddings=views.embeddings[: need - 1])
        try:
            make()(fewer, batch)
        except (RequirementError, ShapeError) as exc:
            if "view" not in str(exc):
                raise _fail(name, "errors", f"too few views: message does not say so: {exc}") from exc
        else:
            raise _fail(name, "errors", f"accepted {need - 1} views though it requires {need}")
    if batch.targets is not None and views.embeddings:
        n = views.batch_size + 1  # every per-sample field the objective requires, one row too many
        fields = {f: torch.arange(n, device=_DEVICE) if f != "weight" else torch.ones(n, device=_DEVICE)
                  for f in ("index", "domain", "weight") if obj.requires.get(f)}
        bad = Batch(targets=torch.zeros(n, dtype=torch.long, device=_DEVICE), **fields)
        try:
            make()(views, bad)
        except ShapeError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise _fail(name, "errors", f"mismatched batch size raised {type(exc).__name__}: "
                        f"{exc}; expected sdk.ShapeError") from exc
        else:
            raise _fail(name, "errors", "accepted a Batch whose size differs from the Views'")
    _check_state_round_trip(name, obj, make, lambda p: p(views, batch).value)


def _check_state_round_trip(name: str, plugin: Any, make: Callable[[], Any],
                            evaluate: Callable[[Any], Any] | None = None) -> None:
    if not hasattr(plugin, "state_dict"):
        return
    state = copy.deepcopy(plugin.state_dict())
    fresh = make()
    try:
        fresh.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001
        raise _fail(name, "state_dict", f"load_state_dict of its own state failed: {exc}") from exc
    again = fresh.state_dict()
    if isinstance(state, dict):
        for key, value in state.items():
            other = again.get(key) if isinstance(again, dict) else None
            if isinstance(value, Tensor) and not (isinstance(other, Tensor) and torch.equal(value, other)):
                raise _fail(name, "state_dict", f"entry {key!r} differs after a round trip")
    if evaluate is not None:
        for p in (plugin, fresh):
            if hasattr(p, "eval"):
                p.eval()
        torch.manual_seed(0)
        a = evaluate(plugin)
        torch.manual_seed(0)
        b = evaluate(fresh)
        if isinstance(a, Tensor) and not torch.allclose(a.detach().float(), b.detach().float(),
                                                        rtol=1e-5, atol=1e-6):
            raise _fail(name, "state_dict", "a plugin rebuilt from the state_dict computes "
                        "a different result")


def _check_sampler(name: str, make: Callable[[], Any]) -> None:
    sampler = make()
    if not isinstance(sampler, Sampler):  # data-level sampler (torch.utils.data.Sampler)
        _check_state_round_trip(name, sampler, make)
        return
    views, batch = example_inputs(sampler)
    pairs = sampler.pairs(views, batch)
    if not isinstance(pairs, Pairs):
        raise _fail(name, "output", f"returned {type(pairs).__name__}, expected Pairs")
    rows = views.n_views * views.batch_size
    if pairs.positive.shape[0] != rows:
        raise _fail(name, "output", f"masks have {pairs.positive.shape[0]} rows, expected {rows}")
    if pairs.weight is not None and not torch.isfinite(pairs.weight).all():
        raise _fail(name, "output", "pair weights are not finite")
    _check_state_round_trip(name, sampler, make)


def _check_encoder(name: str, make: Callable[[], Any]) -> None:
    enc = make()
    x = example_inputs(enc)
    z = enc(x)
    want = (*x.shape[:2], enc.out_dim) if enc.sequence else (x.shape[0], enc.out_dim)
    if z.shape != want:
        raise _fail(name, "output", f"shape {list(z.shape)}, expected {list(want)}")
    z.pow(2).mean().backward()
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters()):
        raise _fail(name, "gradient", "no parameter received a gradient")
    with torch.autocast(_DEVICE.type, dtype=torch.bfloat16):
        if not torch.isfinite(enc(x).float()).all():
            raise _fail(name, "bfloat16", "non-finite output under bf16 autocast")
    _check_state_round_trip(name, enc, make, lambda p: p(x))


def _calibrator_example(cal: Any) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(scores, labels, fit's keyword arguments)``: a calibrator's ``example_inputs`` give
    the first two, and a third, a dict, where it declares ``fit_requires``."""
    scores, labels, *rest = example_inputs(cal)
    return scores, labels, (rest[0] if rest else {})


def _check_calibrator(name: str, make: Callable[[], Any]) -> None:
    cal = make()
    scores, labels, extras = _calibrator_example(cal)
    out = cal.fit(scores, labels, **extras)
    if out is not cal:
        raise _fail(name, "fit", "fit() must return self")
    calibrated = cal(scores)
    if cal.inputs not in ("logits", "probabilities"):
        _check_other_calibrator(name, make, cal, scores, labels, extras, calibrated)
        return
    if calibrated.shape != scores.shape or not torch.isfinite(calibrated).all():
        raise _fail(name, "output", f"calibrated {cal.inputs} {list(calibrated.shape)} are not "
                    f"finite {list(scores.shape)}")
    typed = Logits if cal.inputs == "logits" else Probabilities
    if not torch.equal(cal(typed(scores)), calibrated):
        raise _fail(name, "inputs", f"sdk.{typed.__name__} scores calibrate differently from plain ones")
    other = Probabilities(scores.softmax(-1)) if cal.inputs == "logits" else Logits(scores.log())
    for call in (lambda: make().fit(other, labels), lambda: cal(other)):
        try:
            call()
        except TypeError as exc:
            if cal.name not in str(exc):
                raise _fail(name, "inputs", f"the error does not name the calibrator: {exc}") from exc
        else:
            raise _fail(name, "inputs", f"accepted sdk.{type(other).__name__} though it takes "
                        f"{cal.inputs}")
    _check_state_round_trip(name, cal, make, lambda p: p(scores))


def _check_other_calibrator(name: str, make: Callable[[], Any], cal: Any, scores: Tensor,
                            labels: Tensor, extras: dict[str, Any], calibrated: Tensor) -> None:
    """A calibrator of features, regression or similarities: one finite output row per input
    row, typed class scores refused, a missing ``fit_requires`` argument refused, and the state
    round trip."""
    n = scores.shape[0]
    if calibrated.dim() != 2 or calibrated.shape[0] != n or not torch.isfinite(calibrated).all():
        raise _fail(name, "output", f"calibrated {list(calibrated.shape)} is not finite [{n}, K]")
    for call in (lambda: make().fit(Logits(scores), labels, **extras), lambda: cal(Logits(scores))):
        try:
            call()
        except TypeError as exc:
            if cal.name not in str(exc):
                raise _fail(name, "inputs", f"the error does not name the calibrator: {exc}") from exc
        else:
            raise _fail(name, "inputs", f"accepted sdk.Logits though it takes {cal.inputs}")
    for key in cal.fit_requires:
        try:
            make().fit(scores, labels, **{k: v for k, v in extras.items() if k != key})
        except RequirementError as exc:
            if cal.name not in str(exc) or key not in str(exc):
                raise _fail(name, "inputs", f"the error does not name the calibrator and "
                            f"{key}: {exc}") from exc
        else:
            raise _fail(name, "inputs", f"fit without {key}= was accepted")
    _check_state_round_trip(name, cal, make, lambda p: p(scores))


def _check_detector(name: str, make: Callable[[], Any]) -> None:
    det = make()
    x_in, labels, x_test, x_out = example_inputs(det)
    if det.needs_fit:
        try:
            det.score(x_test)
        except NotFittedError:
            pass
        else:
            raise _fail(name, "errors", "scored before fit() without raising sdk.NotFittedError")
    if det.fit(x_in, labels) is not det:
        raise _fail(name, "fit", "fit() must return self")
    s_in, s_out = det.score(x_test), det.score(x_out)
    if s_in.shape != (x_test.shape[0],) or not torch.isfinite(torch.cat([s_in, s_out])).all():
        raise _fail(name, "output", f"scores {list(s_in.shape)} must be finite, one per row "
                    f"[{x_test.shape[0]}]")
    if not s_out.float().mean() > s_in.float().mean():
        raise _fail(name, "direction", f"out-of-distribution rows score {float(s_out.float().mean()):.4g} "
                    f"on average, in-distribution ones {float(s_in.float().mean()):.4g}: higher "
                    "must mean more anomalous")
    streamed = make()
    for lo in range(0, x_in.shape[0], 16):  # the same data in batches of 16
        streamed.update(x_in[lo:lo + 16], labels[lo:lo + 16])
    if not torch.allclose(streamed.finalize().score(x_test), s_in, rtol=1e-4, atol=1e-5):
        raise _fail(name, "streaming", "fitted batch by batch it scores differently from one fit "
                    "on all the data")
    low = det.score(_cast(x_test, torch.bfloat16))
    if not torch.isfinite(low.float()).all():
        raise _fail(name, "bfloat16", "non-finite scores for bf16 inputs")
    wide = torch.cat([x_test, x_test[:, :1]], dim=1)
    for bad, what in ((wide, "one column too many"), (x_test[0], "a single row without a batch dimension")):
        try:
            det.score(bad)
        except ShapeError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise _fail(name, "errors", f"{what} raised {type(exc).__name__}: {exc}; expected "
                        "sdk.ShapeError") from exc
        else:
            raise _fail(name, "errors", f"scored {what}")
    _check_state_round_trip(name, det, make, lambda p: p.score(x_test))


def _check_adapter(name: str, make: Callable[[], Any]) -> None:
    adapter = make()
    model, x = example_inputs(adapter)
    initial = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    own = copy.deepcopy(adapter.state_dict())
    torch.manual_seed(0)
    first = adapter.adapt(model, x)
    if first.shape[0] != x.shape[0] or not torch.isfinite(first).all():
        raise _fail(name, "output", f"outputs {list(first.shape)} must be finite, one per row of "
                    f"the batch [{x.shape[0]}, ...]")
    adapter.adapt(model, x)
    adapter.reset()
    found = _first_difference(initial, model.state_dict(), "")
    if found is not None:
        raise _fail(name, "reset", f"after reset() the model's {found} differs from before adapt()")
    if ([m.training for m in model.modules()] != modes
            or [p.requires_grad for p in model.parameters()] != flags):
        raise _fail(name, "reset", "after reset() the model's train/eval modes or requires_grad differ")
    found = _first_difference(own, adapter.state_dict(), "")
    if found is not None:
        raise _fail(name, "reset", f"after reset() the adapter's {found} differs from before adapt()")
    torch.manual_seed(0)
    again = adapter.adapt(model, x)
    if not torch.allclose(again, first, rtol=1e-5, atol=1e-6):
        raise _fail(name, "reset", "after reset() adapting the same batch gives different outputs "
                    "(state outside what reset() restores)")
    try:
        adapter.adapt(copy.deepcopy(model), x)
    except RuntimeError:
        pass
    else:
        raise _fail(name, "errors", "adapted a second model without a reset() in between")
    adapter.reset()
    _check_state_round_trip(name, adapter, make,
                            lambda p: p.adapt(copy.deepcopy(model), x))


def _check_reweighter(name: str, make: Callable[[], Any]) -> None:
    rw = make()
    per_sample, batch = example_inputs(rw)
    w = rw.weights(per_sample, batch)
    if w.shape != per_sample.shape or not torch.isfinite(w).all() or (w < 0).any():
        raise _fail(name, "output", f"weights {list(w.shape)} must be finite, >= 0 and match "
                    f"per_sample {list(per_sample.shape)}")
    reduced = rw.reduce(Loss(value=per_sample.mean(), per_sample=per_sample), batch)
    _check_grads(name, per_sample, reduced.value)
    _check_state_round_trip(name, rw, make)


def _check_transform(name: str, make: Callable[[], Any]) -> None:
    tf = make()
    x, batch = example_inputs(tf)
    out = tf(x, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Batch)):
        raise _fail(name, "output", "forward must return (x, Batch)")
    if out[0].shape[0] != x.shape[0]:
        raise _fail(name, "output", f"batch dimension changed from {x.shape[0]} to {out[0].shape[0]}")
    _check_state_round_trip(name, tf, make)


def _check_teacher(name: str, make: Callable[[], Any]) -> None:
    teacher = make()
    own = getattr(teacher, "example_inputs", None)
    if callable(own):
        teacher.update(**own(BATCH, _gen()))
    _check_state_round_trip(name, teacher, make)


def _check_plain(name: str, make: Callable[[], Any]) -> None:
    plugin = make()
    if isinstance(plugin, Schedule):
        for step in (0, 10, 100):
            value = plugin(step, 100)
            if not isinstance(value, float):
                raise _fail(name, "output", f"schedule returned {type(value).__name__}, expected float")
    _check_state_round_trip(name, plugin, make)


_CHECKS: dict[type, Callable[[str, Callable[[], Any]], None]] = {
    Objective: _check_objective, Sampler: _check_sampler, Encoder: _check_encoder,
    Calibrator: _check_calibrator, Reweighter: _check_reweighter, Transform: _check_transform,
    Teacher: _check_teacher, Schedule: _check_plain, Metric: _check_plain, Callback: _check_plain,
    Detector: _check_detector, Adapter: _check_adapter,
}


def fresh_copies(create: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``make() -> plugin``: the plugin as ``create()`` builds it after ``torch.manual_seed(0)``,
    on ``device``, new on every call, with the global generator where that build leaves it.
    It is built once and deep-copied after that, so a plugin whose construction draws large
    random buffers (a 65536-entry memory) is not drawn again for every check; an object that
    cannot be deep-copied (a lock, a handle) is built anew each time."""
    template: dict[str, Any] = {}

    def make() -> Any:
        torch.manual_seed(0)
        if template.get("plugin") is not None:
            torch.set_rng_state(template["rng"])
            return copy.deepcopy(template["plugin"])
        plugin = create()
        plugin = plugin.to(device) if isinstance(plugin, torch.nn.Module) else plugin
        if not template:
            rng = torch.get_rng_state()
            try:
                template.update(plugin=copy.deepcopy(plugin), rng=rng)
            except Exception:  # noqa: BLE001 - not copyable: built anew on every call
                template.update(plugin=None)
            torch.set_rng_state(rng)
        return plugin

    return make


def check_plugin(kind: str, name: str, *, builtin: bool = False, registry: Any = None,
                 device: str | torch.device = "cpu", fuzz: int = 30, **params: Any) -> None:
    """Run the conformance checks on plugin ``name`` of ``kind`` built with ``params``.

    ``device`` selects where plugin and inputs live (``"cuda"`` on a GPU machine);
    ``builtin=True`` also requires the card's ``paper`` and ``formula``. Then
    :func:`sdk.fuzz.fuzz_plugin` draws ``fuzz`` valid and as many invalid inputs (0: none);
    it needs hypothesis, a test extra, imported only then.
    """
    global _DEVICE
    _DEVICE = torch.device(device)
    reg = registry if registry is not None else get_registry()
    entry = reg.get(kind, name)
    check_card(entry.card, builtin=builtin)
    label = f"{kind} {name}"

    make = fresh_copies(lambda: reg.create(kind, name, **params), _DEVICE)
    plugin = make()
    check = next((c for base, c in _CHECKS.items() if isinstance(plugin, base)), None)
    if check is None and kind == "sampler" and isinstance(plugin, torch.utils.data.Sampler):
        check = _check_sampler
    elif check is None and kind in ("metric", "callback"):
        check = _check_plain
    if check is None:
        raise _fail(label, "interface", f"{type(plugin).__name__} implements no sdk interface "
                    f"for kind {kind!r}")
    check(label, make)
    if fuzz:
        from sdk.fuzz import fuzz_plugin

        fuzz_plugin(kind, name, max_examples=fuzz, registry=reg, device=_DEVICE, **params)


# resume -------------------------------------------------------------------------------------
class ResumeRuns(NamedTuple):
    """The three trainers of :func:`check_resume`: ``straight`` (uninterrupted), ``killed``
    (stopped after step ``kill_at``) and ``resumed`` (``fit(resume=True)`` in the killed run's
    directory). Their components are the plugins as each run left them."""

    straight: Any
    killed: Any
    resumed: Any


class _Killed(BaseException):
    """A simulated kill: not an ``Exception``, so ``fit`` does not report it as the callback's
    failure (:class:`~sdk.errors.PluginFailure`)."""


class _Kill(Callback):
    """Stops the run (an exception) right after optimizer step ``at``, before that step's
    teacher update and checkpoint: what a process killed at that moment leaves behind."""

    def __init__(self, at: int):
        self.at = at

    def after_optimizer_step(self, state: State) -> None:
        if state.step == self.at:
            raise _Killed


def _first_difference(a: Any, b: Any, key: str) -> str | None:
    """The key path (and how it differs) of the first entry where ``a`` and ``b`` are not
    bitwise equal; ``None`` when they are."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return f"{key!r} ({type(a).__name__} vs {type(b).__name__})"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{key!r} ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})"
        if not torch.equal(a, b):
            if a.is_floating_point():
                return f"{key!r} (max |difference| {float((a.double() - b.double()).abs().max()):.3g})"
            return f"{key!r} ({int((a != b).sum())} entries differ)"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{key!r} (keys {sorted(map(str, a.keys() ^ b.keys()))} in one run only)"
        for k in a:
            found = _first_difference(a[k], b[k], f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{key!r} ({a!r} vs {b!r})"


def resume_unlabeled_set(mu: int, num_samples: int = 40) -> torch.utils.data.TensorDataset:
    """The unlabelled set of :func:`check_resume`: ``mu * num_samples // 2`` Gaussian rows of 6
    values, items ``(x, 0, index)``."""
    n = mu * num_samples // 2
    rows = torch.arange(n)
    return torch.utils.data.TensorDataset(torch.randn(n, 6, generator=_gen(1)), rows * 0, rows)


def check_resume(*, objective: Callable[[], Objective], tmp_dir: str | os.PathLike,
                 teacher: Callable[[], Any] | None = None, sampler: Callable[[], Any] | None = None,
                 reweighter: Callable[[], Any] | None = None,
                 transforms: Callable[[], Any] | None = None,
                 encoder: Callable[[], torch.nn.Module] | None = None,
                 callbacks: Callable[[], list[Any]] | None = None,
                 unlabeled_transforms: Callable[[], Any] | None = None, mu: int = 0,
                 steps: int = 6, kill_at: int = 3,
                 checkpoint_every: int = 2, num_samples: int = 40, batch_size: int = 8) -> ResumeRuns:
    """Assert that killing a run and resuming it from its checkpoint changes nothing.

    ``objective``, ``teacher``, ``sampler``, ``reweighter``, ``transforms`` and ``encoder`` are
    factories (called with no arguments) of the plugins under test; each of the three runs builds
    its own. An encoder taking 6 inputs (default: a small MLP with 4 outputs, so its outputs can
    serve as the logits of the 4 classes) is trained for ``steps`` optimizer steps with
    :class:`sdk.Trainer` on a fixed dataset of ``num_samples`` Gaussian rows (targets ``i % 4``,
    ``Batch.index`` the row, ``Batch.domain`` ``i % 2``), shuffled batches of ``batch_size``, a
    checkpoint every ``checkpoint_every`` steps and ``transforms`` (default
    ``GaussianNoise(0.1)``) once per view, and ``callbacks`` (a factory of a list). With
    ``mu > 0`` the run is semi-supervised: ``fit(..., unlabeled=...)`` also draws shuffled
    batches of ``mu * batch_size`` (``drop_last``) from :func:`resume_unlabeled_set` (``mu *
    num_samples // 2`` rows indexed ``0 .. N-1``, so the unlabelled loader wraps around at other
    steps than the labelled one) through ``unlabeled_transforms`` (default
    ``(GaussianNoise(0.1), GaussianNoise(0.5))``, weak and strong):

    1. straight through, in ``tmp_dir/straight``;
    2. in ``tmp_dir/interrupted``, stopped by an exception right after step ``kill_at``, so the
       steps after the last checkpoint are lost;
    3. ``fit(resume=True)`` in ``tmp_dir/interrupted``, which reloads that checkpoint and
       replays the lost steps.

    Runs 1 and 3 must end bitwise equal: the encoder's parameters, and every entry of every
    stateful component's ``state_dict`` (objective, teacher, sampler, reweighter, transforms) and
    every buffer of those that are modules. An ``AssertionError`` names the component, its class and
    the first differing key. Returns the three trainers (:class:`ResumeRuns`) for further
    checks of the plugins' own state.
    """
    from torch.utils.data import DataLoader

    from sdk.data import GaussianNoise
    from sdk.engine import Trainer
    from sdk.registry import create

    if not checkpoint_every < kill_at < steps:
        raise ValueError(f"check_resume needs checkpoint_every < kill_at < steps (a checkpoint "
                         f"before the kill, steps after it), got {checkpoint_every}, {kill_at}, "
                         f"{steps}")
    tmp_dir = Path(tmp_dir)
    rows = torch.arange(num_samples)
    data = torch.utils.data.TensorDataset(torch.randn(num_samples, 6, generator=_gen(0)), rows % 4, rows,
                                          rows % 2)

    def run(run_dir: Path, *, kill: bool = False, resume: bool = False) -> Any:
        torch.manual_seed(0)
        model = encoder() if encoder else create("encoder", "mlp", in_dim=6, out_dim=4,
                                                 hidden_dims=(16,), batch_norm=False)
        extra = callbacks() if callbacks else []
        trainer = Trainer(model, objective(), teacher=teacher() if teacher else None,
                          sampler=sampler() if sampler else None,
                          reweighter=reweighter() if reweighter else None,
                          transforms=transforms() if transforms else GaussianNoise(0.1),
                          unlabeled_transforms=(unlabeled_transforms() if unlabeled_transforms
                                                else (GaussianNoise(0.1), GaussianNoise(0.5))),
                          max_steps=steps, run_dir=run_dir, checkpoint_every=checkpoint_every,
                          progress=False, device="cpu",
                          callbacks=[*extra, _Kill(kill_at)] if kill else extra)
        unlabeled = (DataLoader(resume_unlabeled_set(mu, num_samples), batch_size=mu * batch_size,
                                shuffle=True, drop_last=True) if mu else None)
        try:
            trainer.fit(DataLoader(data, batch_size=batch_size, shuffle=True), unlabeled=unlabeled,
                        resume=resume)
        except _Killed:
            pass
        return trainer

    straight = run(tmp_dir / "straight")
    killed = run(tmp_dir / "interrupted", kill=True)
    if killed.step != kill_at or killed.checkpoint_path is None:
        raise _fail("resume", "kill", f"the interrupted run stopped at step {killed.step}; expected "
                    f"step {kill_at}, with a checkpoint before it")
    resumed = run(tmp_dir / "interrupted", resume=True)
    if resumed.step != straight.step:
        raise _fail("resume", "steps", f"the resumed run ended at step {resumed.step}, the "
                    f"uninterrupted one at {straight.step}")

    want, got = straight._stateful(), resumed._stateful()
    if want.keys() != got.keys():
        raise _fail("resume", "components", f"stateful components {sorted(want)} vs {sorted(got)}")
    for role in sorted(want, key=lambda r: r == "encoder"):  # a plugin's state before its symptoms
        component = want[role]
        found = _first_difference(component.state_dict(), got[role].state_dict(), "")
        where = "state_dict entry"
        if found is None and isinstance(component, torch.nn.Module):
            found = _first_difference(dict(component.named_buffers()),
                                      dict(got[role].named_buffers()), "")
            where = "buffer"
        if found is not None:
            raise _fail(f"{role} {type(component).__name__}", "resume",
                        f"after a kill at step {kill_at} and a resume, {where} {found} differs "
                        f"from an uninterrupted run")
    return ResumeRuns(straight, killed, resumed)


# distributed ----------------------------------------------------------------------------------
DDP_BATCH = 5  # per rank: the global batch (10 for 2 ranks) differs from DIM, CLASSES and memory size


class Plugin(NamedTuple):
    """A plugin to build in every process: ``Plugin("sampler", "label_positives", {})``; may be
    a parameter value of another (``Plugin("objective", "nt_xent", {"sampler": Plugin(...)})``)."""

    kind: str
    name: str
    params: dict[str, Any] = {}

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={v.label}" if isinstance(v, Plugin) else f"{k}={v!r}"
                          for k, v in self.params.items())
        return f"{self.name}({shown})" if shown else self.name

    def build(self) -> Any:
        from sdk.registry import create

        params = {k: v.build() if isinstance(v, Plugin) else v for k, v in self.params.items()}
        return create(self.kind, self.name, **params)


def _ddp_inputs(obj: Objective, total: int) -> tuple[Views, Batch]:
    """The global batch of ``total`` samples (float64): the objective's own ``example_inputs`` or
    synthetic ones (random class ids), plus a memory of extra negatives for objectives that
    consume them."""
    from sdk.contrastive import NEGATIVES, NEGATIVES_INDEX, NEGATIVES_MASK

    g = _gen(0)
    own = getattr(obj, "example_inputs", None)
    if callable(own):
        views, batch = own(total, g)
    else:  # classes drawn at random, so the ranks hold different mixes of them
        views, batch = objective_inputs(obj, g, total)
        batch = batch.evolve(targets=with_unknown(obj, torch.randint(0, CLASSES, (total,), generator=g), g))
    if Input.EXTRA_NEGATIVES in obj.consumes and views.embeddings:
        m = 3 * total + 1
        dim = views.embeddings[0].shape[1]
        memory = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=1)
        views = views.evolve(extras={**views.extras, NEGATIVES: memory,
                                     NEGATIVES_MASK: torch.rand(m, generator=g) < 0.8,
                                     NEGATIVES_INDEX: torch.randint(0, 2 * total, (m,), generator=g)})
    return _cast((views, batch), torch.float64)


def _ddp_step(case: Plugin, total: int, rank: int = 0, world: int = 1,
              train: bool = False) -> dict[str, Any]:
    """Loss and gradients (inputs, objective parameters) of ``case`` in eval mode (``train``:
    training mode) on this rank's share of the global batch of ``total`` samples
    (``world == 1``: all of it), and its buffers after the forward.

    Every tensor is split along its first dimension of size ``total`` (tensors without one,
    such as a memory of negatives, are shared); ``split`` holds that dimension per input
    gradient (None: shared)."""
    torch.manual_seed(0)
    obj = case.build().double().train(train)
    views, batch = _ddp_inputs(obj, total)
    per = total // world
    dims: dict[int, int | None] = {}

    def share(t: Tensor) -> Tensor:
        dim = next((d for d, n in enumerate(t.shape) if n == total), None)
        part = (t if dim is None else t.narrow(dim, rank * per, per)).detach().clone()
        part.requires_grad_(t.requires_grad)
        dims[id(part)] = dim
        return part

    views, batch = _map((views, batch), share)
    torch.manual_seed(1)
    loss = obj(views, batch).value
    leaves = [t for t in _tensors((views, batch)) if t.requires_grad]
    params = [p for p in obj.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return {"loss": loss.detach(), "inputs": list(grads[:len(leaves)]),
            "split": [dims[id(t)] for t in leaves], "params": list(grads[len(leaves):]),
            "buffers": {k: v.detach().clone() for k, v in obj.named_buffers()}}


def _ddp_worker(cases_path: str, out_dir: str) -> None:
    """One rank of :func:`distributed_failures` (started with torchrun's environment)."""
    from sdk import distributed

    torch.set_num_threads(1)
    distributed.init("gloo")
    rank, world = distributed.rank(), distributed.world_size()
    results: dict[str, Any] = {}
    cases, training = torch.load(cases_path, weights_only=False)
    for case in cases:
        try:
            results[case.label] = _ddp_step(case, DDP_BATCH * world, rank, world,
                                            train=case.label in training)
        except Exception as exc:  # noqa: BLE001 - reported by the parent, naming the case
            results[case.label] = f"{type(exc).__name__}: {exc}"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _close(got: Tensor | None, want: Tensor | None, tol: float) -> str | None:
    """None when ``got`` and ``want`` agree within ``tol`` (absolute), else how they differ."""
    if got is None or want is None:
        return None if got is None and want is None else "a gradient is missing on one side"
    if got.shape != want.shape:
        return f"shapes {list(got.shape)} vs {list(want.shape)}"
    diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    return None if diff <= tol else f"max |difference| {diff:.3g} > {tol:g}"


def _compare(ranks: list[Any], single: dict[str, Any], world: int, tol: float) -> str | None:
    """The first way the ranks' results differ from the single process's (None: they agree).

    The global loss is the mean of the rank losses; a rank's gradient with respect to its share
    of an input is ``world`` times the single process's (every rank's loss is a mean over its
    anchors and the gather's backward sums them), a shared input's and a parameter's gradient
    is the mean over the ranks (what DDP's averaging gives)."""
    for r in ranks:
        if isinstance(r, str):
            return f"a rank raised {r}"
    if not any(g is not None and bool(g.abs().sum() > 0) for g in single["inputs"]):
        return "degenerate case: no input receives a gradient in one process"
    found = _close(sum(r["loss"] for r in ranks) / world, single["loss"], tol)
    if found:
        return f"loss: {found}"
    for i, (dim, want) in enumerate(zip(single["split"], single["inputs"])):
        grads = [r["inputs"][i] for r in ranks]
        if dim is None:
            got = None if grads[0] is None else sum(grads) / world
        else:
            got = None if grads[0] is None else torch.cat(grads, dim=dim) / world
        found = _close(got, want, tol)
        if found:
            return f"gradient of input #{i}: {found}"
    for i, want in enumerate(single["params"]):
        grads = [r["params"][i] for r in ranks]
        found = _close(None if grads[0] is None else sum(grads) / world, want, tol)
        if found:
            return f"gradient of parameter #{i}: {found}"
    for key, want in single["buffers"].items():
        for r, res in enumerate(ranks):
            got = res["buffers"].get(key)
            found = ("missing" if got is None else _close(got.double(), want.double(), tol)
                     if want.is_floating_point() else None if torch.equal(got, want) else "differs")
            if found:
                return f"buffer {key!r} on rank {r} after the forward: {found}"
    return None


# symptoms of a rendezvous that failed for the machine's sake (the port, taken between our probe
# and the ranks' bind, or a connection dropped under load), not for the code's
_RENDEZVOUS_FAILURES = ("terminate called without an active exception", "Connection refused",
                        "Address already in use", "Connection reset by peer",
                        "Socket Timeout", "connect() timed out")


def run_ranks(argv: Sequence[str], *, world: int = 2, timeout: float = 180.0,
              env: Mapping[str, str] | None = None, cwd: str | None = None,
              attempts: int = 3) -> list[str]:
    """Run ``argv`` as ``world`` gloo ranks on this machine (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` on a free port, one thread each) and return each rank's
    output; raise ``AssertionError`` with the output of a rank that failed. A launch whose
    failure reads as a failed rendezvous (see ``_RENDEZVOUS_FAILURES``) is retried on a new
    port, up to ``attempts`` launches in all: a code failure repeats and is reported."""
    import socket
    import subprocess

    for attempt in range(1, attempts + 1):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = []
        for rank in range(world):
            rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(list(argv), env=rank_env, cwd=cwd, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs, failed = [], None
        for proc in procs:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise AssertionError(f"the {world} ranks did not finish in {timeout:g} s") from None
            outputs.append(output)
            if proc.returncode != 0 and failed is None:
                failed = (proc.returncode, output)
        if failed is None:
            return outputs
        if attempt < attempts and any(any(sign in out for sign in _RENDEZVOUS_FAILURES)
                                      for out in outputs):
            continue
        raise AssertionError(f"a rank exited with {failed[0]}:\n{failed[1]}")
    raise AssertionError("unreachable")


def distributed_failures(cases: list[Plugin], *, training: Collection[str] = (), world: int = 2,
                         tol: float = 1e-6, timeout: float = 300.0) -> dict[str, str]:
    """Run every objective of ``cases`` in ``world`` gloo processes (started once, for all
    cases) on its share of a global batch of ``DDP_BATCH * world`` samples, and in this process
    on the whole batch; return ``{case label: what differs}`` for the cases that disagree.

    Objectives are built with their default ``gather`` (the point: "auto" must gather),
    seeded alike, in float64 and eval mode, so state a training forward updates (BatchNorm
    statistics) stays frozen; the cases whose labels are in ``training`` run in training mode,
    and every rank's buffers after the forward (e.g. iSogCLR's per-sample temperatures) must
    equal the single process's. Compared as well: the mean of the rank losses with the loss,
    ``1/world`` of a rank's gradient with respect to its share of an input with that share of
    the single process's, the ranks' mean gradient of a shared input or a parameter with the
    single process's (what DDP's averaging gives). Inputs are the objective's
    ``example_inputs(batch_size, generator)`` or synthetic ones, plus a memory of extra
    negatives in ``Views.extras`` when the objective consumes them.
    """
    import sys
    import tempfile

    import sdk

    root = str(Path(sdk.__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        cases_path = os.path.join(tmp, "cases.pt")
        torch.save((list(cases), set(training)), cases_path)
        code = "import sys; from sdk.testing import _ddp_worker; _ddp_worker(sys.argv[1], sys.argv[2])"
        path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
        try:
            run_ranks([sys.executable, "-c", code, cases_path, tmp], world=world, timeout=timeout,
                      env={"PYTHONPATH": path})
        except AssertionError as exc:
            raise _fail("distributed", "ranks", str(exc)) from None
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    failures = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in cases:
            try:
                single = _ddp_step(case, DDP_BATCH * world, train=case.label in training)
            except Exception as exc:  # noqa: BLE001 - reported, naming the case
                failures[case.label] = f"one process raised {type(exc).__name__}: {exc}"
                continue
            found = _compare([r[case.label] for r in ranks], single, world, tol)
            if found:
                failures[case.label] = found
    finally:
        torch.set_num_threads(threads)
    return failures


def check_distributed(cases: list[Plugin], *, training: Collection[str] = (), world: int = 2,
                      tol: float = 1e-6) -> None:
    """Assert that every objective of ``cases`` (:class:`Plugin` specs) gives, in ``world``
    gloo processes, the loss and gradients of one process on the concatenated batch (see
    :func:`distributed_failures`)."""
    failures = distributed_failures(cases, training=training, world=world, tol=tol)
    if failures:
        raise _fail("distributed", "equivalence", "; ".join(f"{k}: {v}" for k, v in failures.items()))
