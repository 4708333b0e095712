"""sdk.Trainer: what it optimises, the events it emits, the state they see, inference helpers."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import GaussianNoise
from sdk.events import EVENTS, State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, DataSampler, Objective, Teacher
from sdk.registry import get_registry
from sdk.types import Batch, Loss, Views

SGD = functools.partial(torch.optim.SGD, lr=0.1)


class TemperedCE(Objective):
    """Cross-entropy of ``logits / t`` with a learnable ``t``, plus a teacher-output penalty."""

    requires = {"logits": True, "targets": True}

    def __init__(self) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))

    def forward(self, views: Views, batch: Batch) -> Loss:
        loss = F.cross_entropy(views.logits / self.log_t.exp(), batch.targets)
        if "teacher" in views.extras:
            loss = loss + views.extras["teacher"][0].pow(2).mean()
        return Loss(value=loss)


class ScaledTeacher(Teacher):
    """A teacher with its own trainable parameter (its output enters the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.updates = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.scale

    def update(self, **context) -> None:
        self.updates += 1


class PullTo3(nn.Module, Callback):
    """A callback with a parameter: adds ``(w - 3)^2`` to the loss in ``after_loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def after_loss(self, state) -> None:
        loss = state.loss
        state.loss = Loss(value=loss.value + (self.w - 3).pow(2), logs=loss.logs)


def _snapshot(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_optimises_every_parameter_that_requires_grad(loader, make_mlp):
    enc, obj, teacher, cb = make_mlp(), TemperedCE(), ScaledTeacher(), PullTo3()
    before = _snapshot(enc, obj, teacher, cb)
    trainer = sdk.Trainer(enc, obj, SGD, teacher=teacher, callbacks=[cb], max_steps=20,
                          progress=False)
    trainer.fit(loader)
    after = _snapshot(enc, obj, teacher, cb)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    expected = [*enc.parameters(), obj.log_t, teacher.scale, cb.w]
    assert len(held) == len(expected) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in expected}
    assert teacher.updates == 20
    # the callback's term is really in the loss being minimised: w moved towards 3
    assert 0 < float(cb.w.detach()) < 3


def test_given_optimizer_gets_the_parameters_it_lacks(loader, make_mlp):
    enc, obj = make_mlp(), TemperedCE()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    sdk.Trainer(enc, obj, opt, max_steps=2, progress=False).fit(loader)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["params"] == [obj.log_t]
    assert float(obj.log_t.detach()) != 0.0


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []

    def _rec(self, name, state):
        assert isinstance(state, State)
        self.events.append((name, state.epoch, state.step, state.trainer.batch_idx))


for _name in EVENTS:
    setattr(Recorder, _name, functools.partialmethod(Recorder._rec, _name))


def _expected_events(epochs: int, batches: int, accumulate: int, val: bool) -> list[str]:
    out = ["on_fit_start"]
    for _ in range(epochs):
        out.append("on_epoch_start")
        for b in range(batches):
            out += ["after_forward", "after_loss", "before_backward"]
            if (b + 1) % accumulate == 0 or b + 1 == batches:
                out += ["before_optimizer_step", "after_optimizer_step"]
        out.append("on_epoch_end")
        if val:
            out.append("on_validation_end")
        out.append("on_log")  # the epoch record (train records come every 50 steps: none here)
    return out + ["on_fit_end"]


class HookModule:
    """A plugin module implementing every event as a pluggy hook."""

    def __init__(self) -> None:
        self.calls: list[str] = []


for _name in EVENTS:
    def _hook(self, state, _name=_name):
        assert isinstance(state, State)
        self.calls.append(_name)

    _hook.__name__ = f"paperplug_{_name}"
    setattr(HookModule, f"paperplug_{_name}", hookimpl(_hook))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_event_order_and_counts(data, make_mlp, accumulate):
    loader = DataLoader(data, batch_size=10, shuffle=True)  # 64 items: 7 batches, last partial
    rec, hooks = Recorder(), HookModule()
    pm = get_registry().plugin_manager
    pm.register(hooks, name="engine-test-hooks")
    try:
        sdk.Trainer(make_mlp(), TemperedCE(), SGD, callbacks=[rec], max_epochs=2,
                    accumulate=accumulate, progress=False).fit(loader, val_loader=loader)
    finally:
        pm.unregister(name="engine-test-hooks")
    expected = _expected_events(2, 7, accumulate, val=True)
    assert all(getattr(pm.hook, f"paperplug_{e}").spec is not None for e in EVENTS)
    assert [e[0] for e in rec.events] == expected
    assert hooks.calls == expected
    steps_per_epoch = -(-7 // accumulate)
    opt_steps = [e for e in rec.events if e[0] == "after_optimizer_step"]
    assert [e[2] for e in opt_steps] == list(range(1, 2 * steps_per_epoch + 1))
    epochs = [e[1] for e in rec.events if e[0] == "on_epoch_end"]
    assert epochs == [0, 1]
    # the batch position counts micro-batches within the epoch
    forwards = [e[3] for e in rec.events if e[0] == "after_forward"]
    assert forwards == list(range(7)) * 2


def test_events_see_the_loop_state(loader, make_mlp):
    enc = make_mlp()
    seen: dict[str, object] = {}

    class Probe(Callback):
        def after_forward(self, state):
            seen["views"] = state.views
            seen["batch"] = state.batch
            seen["x"] = state.x

        def after_loss(self, state):
            seen["loss"] = state.loss

        def before_optimizer_step(self, state):
            seen["grad"] = state.model[0].weight.grad.clone()
            seen["step_before"] = state.step

        def after_optimizer_step(self, state):
            seen["step_after"] = state.step
            seen["optimizer"] = state.optimizer

        def on_epoch_end(self, state):
            seen["logs"] = dict(state.trainer.logs)
            seen["epoch"] = state.epoch

        def on_validation_end(self, state):
            seen["val"] = dict(state.trainer.val_metrics)

    trainer = sdk.Trainer(enc, TemperedCE(), SGD, callbacks=[Probe()], max_epochs=1,
                          log_every=1, progress=False)
    trainer.fit(loader, val_loader=loader)
    assert trainer.model is enc
    assert isinstance(seen["views"], Views) and seen["views"].logits.shape == (16, 3)
    assert isinstance(seen["batch"], Batch) and seen["batch"].targets.shape == (16,)
    assert seen["x"].shape == (16, 8)
    assert seen["batch"].index is not None
    assert isinstance(seen["loss"], Loss) and seen["loss"].value.requires_grad
    assert seen["grad"].abs().sum() > 0
    assert (seen["step_before"], seen["step_after"]) == (3, 4)
    assert seen["optimizer"] is trainer.optimizer
    assert isinstance(seen["logs"]["loss"], float) and seen["epoch"] == 0
    assert set(seen["val"]) >= {"loss", "accuracy", "nll", "ece"}
    assert trainer.history[-1]["kind"] == "epoch" and "val/accuracy" in trainer.history[-1]


def test_before_optimizer_step_can_transform_gradients(loader, make_mlp):
    enc = make_mlp()
    frozen = enc[0].weight.detach().clone()
    bias = enc[0].bias.detach().clone()

    class ZeroFirstLayer(Callback):
        def before_optimizer_step(self, state):
            state.model[0].weight.grad.zero_()

    sdk.Trainer(enc, TemperedCE(), SGD, callbacks=[ZeroFirstLayer()], max_steps=8,
                progress=False).fit(loader)
    assert torch.equal(enc[0].weight, frozen)
    assert not torch.equal(enc[0].bias, bias)


def test_epoch_end_can_embed_the_whole_dataset(data, loader, make_mlp):
    enc = make_mlp()
    got = []

    class Refresh(Callback):
        def on_epoch_end(self, state):
            got.append((state.trainer.embed(state.trainer.train_loader), state.model.training))

    trainer = sdk.Trainer(enc, TemperedCE(), SGD, callbacks=[Refresh()], max_epochs=2,
                          progress=False)
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True, drop_last=True))
    assert len(got) == 2
    emb, training = got[-1]
    assert training  # embed restores train mode
    with torch.no_grad():
        assert torch.allclose(emb, enc(data.x), atol=1e-6)  # every item, dataset order
    assert emb.shape == (len(data), 3)
    assert not torch.equal(got[0][0], got[1][0])


def test_embed_predict_evaluate(data, loader, make_mlp):
    enc = make_mlp()
    trainer = sdk.Trainer(enc, TemperedCE(), SGD, max_epochs=3, progress=False).fit(loader)
    with torch.no_grad():
        ref = enc(data.x)
    assert torch.allclose(trainer.predict(loader), ref, atol=1e-6)
    emb, y = trainer.embed(loader, with_targets=True)
    assert torch.equal(y, data.y)
    metrics = trainer.evaluate(loader)
    acc = (ref.argmax(-1) == data.y).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(acc)
    t = float(trainer.objective.log_t.detach().exp())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(ref / t, data.y).item(), rel=1e-5)


def _seeded_run(data, make_mlp, seed: int) -> list[torch.Tensor]:
    enc = make_mlp(seed=0)
    loader = DataLoader(data, batch_size=16, shuffle=True)
    sdk.Trainer(enc, TemperedCE(), SGD, transforms=GaussianNoise(0.3), max_epochs=2,
                seed=seed, progress=False).fit(loader)
    return _snapshot(enc)


def test_seeded_runs_are_reproducible(data, make_mlp):
    a, b = _seeded_run(data, make_mlp, 1), _seeded_run(data, make_mlp, 1)
    c = _seeded_run(data, make_mlp, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


_SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
_PROJECT = str(Path(sdk.__file__).parent.parent)
_NOT_PROJECT = ("/tests/", "/.venv/", "/site-packages/")


@pytest.mark.parametrize("host_window", [False, True])
def test_no_host_sync_between_log_points(loader, make_mlp, monkeypatch, host_window):
    """Between log points the engine (sdk/, plugins/) never reads a tensor on the host, but for
    the CPU's log window, which reads each loss (``tolist``: no sync on the CPU) and nothing else."""
    calls: list[str] = []
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(_PROJECT) and not any(d in caller for d in _NOT_PROJECT):
                calls.append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    spans: list[tuple[int, int]] = []

    class Mark(Callback):  # from an epoch's first forward to its last optimizer step
        def on_epoch_start(self, state):
            spans.append((-1, -1))

        def after_forward(self, state):
            if spans[-1][0] < 0:
                spans[-1] = (len(calls), -1)

        def after_optimizer_step(self, state):
            spans[-1] = (spans[-1][0], len(calls))

    enc = make_mlp()
    trainer = sdk.Trainer(enc, sdk.create("objective", "cross_entropy"), SGD, callbacks=[Mark()],
                          max_epochs=2, log_every=1000, clip_grad_norm=1.0, progress=False)
    trainer._host_window = host_window  # False: an accelerator's window, on this CPU
    trainer.fit(loader)
    assert len(spans) == 2
    for start, end in spans:
        reads = calls[start:end]
        if host_window:  # one read per step, the engine's window reading the step's loss
            assert len(reads) == len(loader), reads
            assert all(r.startswith("tolist from") and "sdk/engine.py" in r for r in reads), reads
        else:
            assert not reads, reads


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"precision": "16"}, "precision"),
    ({"accumulate": 0}, "accumulate"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_epochs": None}, "max_epochs"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
    ({"sampler": object()}, "sampler"),
])
def test_bad_arguments_name_the_parameter(make_mlp, kwargs, param):
    args = {"max_epochs": 1, **kwargs}
    with pytest.raises(sdk.ConfigError) as err:
        sdk.Trainer(make_mlp(), TemperedCE(), **args)
    assert err.value.param == param


def test_objective_needing_views_requires_transforms(make_mlp):
    with pytest.raises(sdk.RequirementError, match="needs 2 views"):
        sdk.Trainer(make_mlp(), sdk.create("objective", "nt_xent"), max_epochs=1)


@pytest.mark.parametrize("name", ["queue", "memory_bank"])
def test_accumulation_teachers_observe_every_micro_batch_and_update_once_per_step(data, make_mlp,
                                                                                  name):
    """64 samples, batches of 8, accumulate 4: 8 micro-batches, 2 optimizer steps an epoch.
    Every micro-batch's keys reach the queue / memory bank, the momentum update runs per step."""
    base = type(sdk.create("teacher", name))

    class Counting(base):
        produces = frozenset()  # TemperedCE ignores the negatives; only the calls are counted

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.observed, self.updates = 0, []

        def observe(self, **context) -> None:
            self.observed += 1
            super().observe(**context)

        def update(self, **context) -> None:
            self.updates.append((context["step"], context["views"]))
            super().update(**context)

    kwargs = ({"size": 128, "momentum": 0.9, "final_momentum": 0.9} if name == "queue"
              else {"num_samples": 64, "num_negatives": 16})
    teacher = Counting(**kwargs)
    sdk.Trainer(make_mlp(), TemperedCE(), SGD, teacher=teacher, accumulate=4, max_epochs=1,
                progress=False).fit(DataLoader(data, batch_size=8, shuffle=True))
    assert teacher.observed == 8
    assert teacher.updates == [(0, None), (1, None)]  # views were observed, not given again
    if name == "queue":
        assert int(teacher.filled) == 64
        assert sorted(teacher.key_index[:64].tolist()) == list(range(64))
    else:
        assert bool(teacher.filled.all())


class EvenPositions(DataSampler):
    """A data sampler that learns the training set's size from the Trainer (``bind``) and
    yields its even positions."""

    def __init__(self) -> None:
        self.size: int | None = None

    def bind(self, dataset) -> None:
        self.size = len(dataset)

    def __iter__(self):
        return iter(range(0, self.size, 2))

    def __len__(self) -> int:
        return (self.size + 1) // 2


class EvenPositionsAtFitStart(EvenPositions):
    """The same, sized by its ``on_fit_start`` event instead of ``bind``."""

    def bind(self, dataset) -> None:
        pass

    def on_fit_start(self, state) -> None:
        self.size = len(state.trainer.train_loader.dataset)


@pytest.mark.parametrize("kind", [EvenPositions, EvenPositionsAtFitStart])
def test_data_sampler_is_bound_to_the_training_set_and_sizes_the_schedule(data, make_mlp, kind):
    """64 samples: 32 even positions in batches of 8, 4 steps an epoch, 12 over 3 epochs."""
    progress: list[tuple[int, int]] = []
    seen: list[torch.Tensor] = []

    class Probe(TemperedCE):
        def set_progress(self, step, max_steps):
            progress.append((step, max_steps))

        def forward(self, views, batch):
            seen.append(batch.index)
            return super().forward(views, batch)

    sampler = kind()
    trainer = sdk.Trainer(make_mlp(), Probe(), SGD, sampler=sampler, max_epochs=3,
                          progress=False)
    trainer.fit(DataLoader(data, batch_size=8, shuffle=True))
    assert sampler.size == len(data)
    assert trainer.total_steps == trainer.step == 12
    assert progress == [(s, 12) for s in range(12)]
    assert torch.cat(seen[:4]).tolist() == list(range(0, 64, 2))


def test_data_sampler_is_sharded_over_ranks(data, make_mlp, monkeypatch):
    """Rank 1 of 2 takes every second index of the data sampler's order; a sampler that shards
    itself (``shards_ranks``) is left as it is."""
    from sdk import distributed
    from sdk.engine import RankShard

    assert [list(RankShard([5, 7, 9, 11, 13], rank=r, world=2)) for r in (0, 1)] == [
        [5, 9, 13], [7, 11, 5]]  # padded by wrapping around, as DistributedSampler does
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    seen: list[torch.Tensor] = []

    class Probe(TemperedCE):
        def forward(self, views, batch):
            seen.append(batch.index)
            return super().forward(views, batch)

    trainer = sdk.Trainer(make_mlp(), Probe(), SGD, sampler=EvenPositions(), max_epochs=1,
                          progress=False)
    trainer.fit(DataLoader(data, batch_size=8))
    assert torch.cat(seen).tolist() == list(range(2, 64, 4)) and trainer.step == 2
    own = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=64, batch_size=8)
    trainer = sdk.Trainer(make_mlp(), TemperedCE(), SGD, sampler=own, max_epochs=1,
                          progress=False)
    trainer._setup()
    assert trainer._prepare_train_loader(DataLoader(data, batch_size=8)).sampler is own


class Recompute(Callback):
    """Before each optimizer step: keeps the step's gradients and records, recomputes them at the
    same parameters, and keeps what the recomputation gave."""

    def __init__(self):
        self.seen = []

    def before_optimizer_step(self, state):
        trainer = state.trainer
        grads = [p.grad.clone() for p in trainer.params]
        records = (state.views, state.batch, state.loss)
        buffers = [b.clone() for b in trainer.objective.buffers()]
        value = trainer.recompute_gradients()
        self.seen.append((grads, [p.grad for p in trainer.params], records,
                          (state.views, state.batch, state.loss), value, buffers,
                          [b.clone() for b in trainer.objective.buffers()]))


class CountingCE(Objective):
    """Cross-entropy that counts its forward passes in a buffer."""

    requires = {"logits": True, "targets": True}

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, views, batch):
        self.calls += 1
        return Loss(value=F.cross_entropy(views.logits, batch.targets))


def test_recompute_gradients_reruns_the_step_and_leaves_records_and_buffers(data, make_mlp):
    seen = Recompute()
    trainer = sdk.Trainer(make_mlp(), CountingCE(), SGD, transforms=GaussianNoise(0.5),
                          callbacks=[seen], max_steps=3, progress=False, device="cpu")
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True))
    assert len(seen.seen) == 3
    for grads, again, records, after, value, buffers, buffers_after in seen.seen:
        for g, h in zip(grads, again):
            assert torch.equal(g, h)  # the same noisy views, not a new draw
        assert all(a is b for a, b in zip(records, after))
        assert torch.equal(value, records[2].value.detach())
        assert [int(b) for b in buffers] == [int(b) for b in buffers_after]  # one count per step
    assert int(trainer.objective.calls) == 3


def test_recompute_gradients_outside_a_step_raises(make_mlp):
    trainer = sdk.Trainer(make_mlp(), CountingCE(), SGD, max_steps=1, progress=False, device="cpu")
    with pytest.raises(RuntimeError, match="call it from before_optimizer_step"):
        trainer.recompute_gradients()
