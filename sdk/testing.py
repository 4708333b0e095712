"""Conformance kit: checks a plugin author runs on their own plugin (and our suite runs on all).

``check_plugin(kind, name, **params)`` builds the plugin through the registry, feeds it
synthetic inputs (or the plugin's own ``example_inputs(batch_size, generator)``) and asserts:
the card is complete, outputs have the documented form, gradients reach every input that
requires grad, bfloat16 inputs work, bad inputs raise clear errors, and ``state_dict``
round-trips. Failures raise ``AssertionError`` naming the plugin and the check.

``check_resume(objective=..., teacher=..., sampler=..., tmp_dir=...)`` trains a tiny model with
stateful plugins through :class:`sdk.Trainer` three times (straight; killed after a checkpoint;
resumed) and asserts the resumed run ends bitwise equal to the straight one.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sdk.errors import RequirementError, ShapeError
from sdk.events import State
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


# resume -------------------------------------------------------------------------------------
class ResumeRuns(NamedTuple):
    """The three trainers of :func:`check_resume`: ``straight`` (uninterrupted), ``killed``
    (stopped after step ``kill_at``) and ``resumed`` (``fit(resume=True)`` in the killed run's
    directory). Their components are the plugins as each run left them."""

    straight: Any
    killed: Any
    resumed: Any


class _Killed(Exception):
    pass


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


def check_resume(*, objective: Callable[[], Objective], tmp_dir: str | os.PathLike,
                 teacher: Callable[[], Any] | None = None, sampler: Callable[[], Any] | None = None,
                 transforms: Callable[[], Any] | None = None,
                 encoder: Callable[[], torch.nn.Module] | None = None, steps: int = 6, kill_at: int = 3,
                 checkpoint_every: int = 2, num_samples: int = 40, batch_size: int = 8) -> ResumeRuns:
    """Assert that killing a run and resuming it from its checkpoint changes nothing.

    ``objective``, ``teacher``, ``sampler``, ``transforms`` and ``encoder`` are factories
    (called with no arguments) of the plugins under test; each of the three runs builds its own.
    An encoder taking 6 inputs (default: a small MLP with 4 outputs, so its outputs can serve as
    the logits of the 4 classes) is trained for ``steps`` optimizer steps with
    :class:`sdk.Trainer` on a fixed dataset of ``num_samples`` Gaussian rows (targets
    ``i % 4``, ``Batch.index`` the row), shuffled batches of ``batch_size``, a checkpoint every
    ``checkpoint_every`` steps and ``transforms`` (default ``GaussianNoise(0.1)``) once per view:

    1. straight through, in ``tmp_dir/straight``;
    2. in ``tmp_dir/interrupted``, stopped by an exception right after step ``kill_at``, so the
       steps after the last checkpoint are lost;
    3. ``fit(resume=True)`` in ``tmp_dir/interrupted``, which reloads that checkpoint and
       replays the lost steps.

    Runs 1 and 3 must end bitwise equal: the encoder's parameters, and every entry of every
    stateful component's ``state_dict`` (objective, teacher, sampler, transforms) and every
    buffer of those that are modules. An ``AssertionError`` names the component, its class and
    the first differing key. Returns the three trainers (:class:`ResumeRuns`) for further
    checks of the plugins' own state.
    """
    from torch.utils.data import DataLoader

    from sdk.data import GaussianNoise, IndexedDataset
    from sdk.engine import Trainer
    from sdk.registry import create

    if not checkpoint_every < kill_at < steps:
        raise ValueError(f"check_resume needs checkpoint_every < kill_at < steps (a checkpoint "
                         f"before the kill, steps after it), got {checkpoint_every}, {kill_at}, "
                         f"{steps}")
    tmp_dir = Path(tmp_dir)
    data = IndexedDataset(torch.randn(num_samples, 6, generator=_gen(0)), torch.arange(num_samples) % 4)

    def run(run_dir: Path, *, kill: bool = False, resume: bool = False) -> Any:
        torch.manual_seed(0)
        model = encoder() if encoder else create("encoder", "mlp", in_dim=6, out_dim=4,
                                                 hidden_dims=(16,), batch_norm=False)
        trainer = Trainer(model, objective(), teacher=teacher() if teacher else None,
                          sampler=sampler() if sampler else None,
                          transforms=transforms() if transforms else GaussianNoise(0.1),
                          max_steps=steps, run_dir=run_dir, checkpoint_every=checkpoint_every,
                          progress=False, device="cpu", callbacks=[_Kill(kill_at)] if kill else [])
        try:
            trainer.fit(DataLoader(data, batch_size=batch_size, shuffle=True), resume=resume)
        except _Killed:
            pass
        return trainer

    straight = run(tmp_dir / "straight")
    killed = run(tmp_dir / "interrupted", kill=True)
    if killed.step != kill_at or not killed.checkpoint_path.exists():
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
