"""Conformance kit: checks a plugin author runs on their own plugin (and our suite runs on all).

``check_plugin(kind, name, **params)`` builds the plugin through the registry, feeds it
synthetic inputs (or the plugin's own ``example_inputs(batch_size, generator)``) and asserts:
the card is complete, outputs have the documented form, gradients reach every input that
requires grad, bfloat16 inputs work, bad inputs raise clear errors, and ``state_dict``
round-trips. Failures raise ``AssertionError`` naming the plugin and the check.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdk.errors import RequirementError, ShapeError
from sdk.interfaces import (
    Calibrator,
    Callback,
    Encoder,
    Metric,
    Objective,
    Reweighter,
    Sampler,
    Schedule,
    Teacher,
    Transform,
)
from sdk.registry import get_registry
from sdk.types import Batch, Loss, Pairs, Views

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
def objective_inputs(obj: Objective, g: torch.Generator) -> tuple[Views, Batch]:
    req = obj.requires
    n_views = int(req.get("views", 0)) or (0 if req.get("logits") else 2)
    embeddings = tuple(torch.randn(BATCH, DIM, generator=g).requires_grad_() for _ in range(n_views))
    logits = torch.randn(BATCH, CLASSES, generator=g).requires_grad_() if req.get("logits") else None
    views = Views(embeddings=embeddings, logits=logits)
    batch = Batch(
        targets=torch.arange(BATCH) % CLASSES,
        index=torch.randperm(BATCH, generator=g),
        domain=torch.arange(BATCH) % 2 if req.get("domain") else None,
        weight=torch.rand(BATCH, generator=g) + 0.5 if req.get("weight") else None,
    )
    return views, batch


def _default_inputs(plugin: Any, g: torch.Generator) -> Any:
    if isinstance(plugin, Objective):
        return objective_inputs(plugin, g)
    if isinstance(plugin, Sampler):
        return (Views(embeddings=(torch.randn(BATCH, DIM, generator=g),
                                  torch.randn(BATCH, DIM, generator=g))),
                Batch(targets=torch.arange(BATCH) % CLASSES, index=torch.arange(BATCH)))
    if isinstance(plugin, Encoder):
        in_dim = getattr(plugin, "in_dim", None)
        if in_dim is None:
            raise _fail(type(plugin).__name__, "inputs",
                        "encoder has no in_dim attribute; define example_inputs()")
        return torch.randn(BATCH, in_dim, generator=g)
    if isinstance(plugin, Calibrator):
        labels = torch.arange(64) % CLASSES
        logits = 3 * torch.nn.functional.one_hot(labels, CLASSES) + torch.randn(64, CLASSES, generator=g)
        return logits, labels
    if isinstance(plugin, Reweighter):
        return (torch.rand(BATCH, generator=g).requires_grad_(),
                Batch(targets=torch.arange(BATCH) % CLASSES, index=torch.arange(BATCH)))
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
    if z.dim() != 2 or z.shape != (x.shape[0], enc.out_dim):
        raise _fail(name, "output", f"shape {list(z.shape)}, expected [{x.shape[0]}, {enc.out_dim}]")
    z.pow(2).mean().backward()
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters()):
        raise _fail(name, "gradient", "no parameter received a gradient")
    with torch.autocast(_DEVICE.type, dtype=torch.bfloat16):
        if not torch.isfinite(enc(x).float()).all():
            raise _fail(name, "bfloat16", "non-finite output under bf16 autocast")
    _check_state_round_trip(name, enc, make, lambda p: p(x))


def _check_calibrator(name: str, make: Callable[[], Any]) -> None:
    cal = make()
    logits, labels = example_inputs(cal)
    out = cal.fit(logits, labels)
    if out is not cal:
        raise _fail(name, "fit", "fit() must return self")
    calibrated = cal(logits)
    if calibrated.shape != logits.shape or not torch.isfinite(calibrated).all():
        raise _fail(name, "output", f"calibrated logits {list(calibrated.shape)} are not "
                    f"finite {list(logits.shape)}")
    _check_state_round_trip(name, cal, make, lambda p: p(logits))


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
}


def check_plugin(kind: str, name: str, *, builtin: bool = False, registry: Any = None,
                 device: str | torch.device = "cpu", **params: Any) -> None:
    """Run the conformance checks on plugin ``name`` of ``kind`` built with ``params``.

    ``device`` selects where plugin and inputs live (``"cuda"`` on a GPU machine);
    ``builtin=True`` also requires the card's ``paper`` and ``formula``.
    """
    global _DEVICE
    _DEVICE = torch.device(device)
    reg = registry if registry is not None else get_registry()
    entry = reg.get(kind, name)
    check_card(entry.card, builtin=builtin)
    label = f"{kind} {name}"

    def make() -> Any:
        torch.manual_seed(0)
        plugin = reg.create(kind, name, **params)
        return plugin.to(_DEVICE) if isinstance(plugin, torch.nn.Module) else plugin

    plugin = make()
    for base, check in _CHECKS.items():
        if isinstance(plugin, base):
            check(label, make)
            return
    if kind == "sampler" and isinstance(plugin, torch.utils.data.Sampler):
        _check_sampler(label, make)
        return
    if kind == "metric" or kind == "callback":
        _check_plain(label, make)
        return
    raise _fail(label, "interface", f"{type(plugin).__name__} implements no sdk interface "
                f"for kind {kind!r}")
