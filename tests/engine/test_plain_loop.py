"""The engine's plain loop (``Trainer._plain_steps``: the common case, without the per-step
machinery of listeners, teachers, reweighters, clipping, accumulation) trains exactly as the
general loop does, and is chosen only where nothing would be skipped."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

import sdk
from sdk import checkpoint as ckpt
from sdk.engine import Trainer
from sdk.interfaces import Callback, Reweighter, Teacher


class _BeforeBackward(Callback):
    """A listener of a per-step event that changes nothing: it sends the run down the general
    loop."""

    def __init__(self):
        self.calls = 0

    def before_backward(self, state):
        self.calls += 1


class _Even(Reweighter):
    def weights(self, per_sample, batch):
        return torch.ones_like(per_sample)


class _Updates(Teacher):
    """A teacher that encodes nothing (so only its updates need the general loop)."""

    def __init__(self):
        super().__init__()
        self.updates = 0

    def update(self, **context):
        self.updates += 1


class _Epochs(Callback):
    """Records what an epoch-level listener sees (the plain loop keeps these events)."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, state):
        self.seen.append((state.epoch, state.step, float(state.loss.value.detach())))


def _run(data, make_mlp, run_dir, *, general, max_steps=None, max_epochs=3, resume=False,
         objective="cross_entropy", **kw):
    epochs = _Epochs()
    callbacks = [epochs, _BeforeBackward()] if general else [epochs]
    trainer = sdk.Trainer(
        make_mlp(), objective() if callable(objective) else sdk.create("objective", objective),
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3),
        callbacks=callbacks, max_epochs=max_epochs, max_steps=max_steps, run_dir=run_dir,
        log_every=3, checkpoint_every=5, progress=False, **kw)
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True), resume=resume)
    assert trainer._plain_loop is not general
    return trainer, epochs.seen


def _same_run(a, b, seen_a, seen_b):
    for (k, p), q in zip(a.encoder.state_dict().items(), b.encoder.state_dict().values()):
        assert torch.equal(p, q), k
    drop = {"samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in b.history]
    assert seen_a == seen_b
    assert (a.step, a.epoch, a.batch_idx) == (b.step, b.epoch, b.batch_idx)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def test_the_plain_loop_trains_exactly_as_the_general_loop(data, make_mlp, tmp_path):
    plain, seen_plain = _run(data, make_mlp, tmp_path / "plain", general=False)
    general, seen_general = _run(data, make_mlp, tmp_path / "general", general=True)
    _same_run(plain, general, seen_plain, seen_general)
    assert plain.step == 12 and len(seen_plain) == 3
    names = sorted(p.name for p in (tmp_path / "plain" / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "general" / "checkpoints").iterdir())
    for name in names:  # checkpoints (written every 5 steps and at epoch ends) agree too
        a = ckpt.load(tmp_path / "plain" / "checkpoints" / name)
        b = ckpt.load(tmp_path / "general" / "checkpoints" / name)
        assert a["position"] == b["position"] and a["running"].keys() == b["running"].keys()
        assert torch.equal(a["running"]["window"], b["running"]["window"])
        assert a["running"]["epoch_count"] == b["running"]["epoch_count"]


def test_a_plain_run_stopped_mid_epoch_resumes_as_a_general_one(data, make_mlp, tmp_path):
    """Stop at step 7 (inside epoch 1, one loss in the log window) in the plain loop, resume
    to step 11 in the general one (and the reverse): both equal a straight general run."""
    straight, seen = _run(data, make_mlp, tmp_path / "straight", general=True, max_steps=11,
                          keep_checkpoints=10)
    for first in (False, True):
        run_dir = tmp_path / f"split-{first}"
        _run(data, make_mlp, run_dir, general=first, max_steps=7)
        resumed, seen_resumed = _run(data, make_mlp, run_dir, general=not first, max_steps=11,
                                     resume=True)
        for p, q in zip(straight.encoder.state_dict().values(),
                        resumed.encoder.state_dict().values()):
            assert torch.equal(p, q)
        assert seen_resumed == seen[1:]  # epoch 0 ended before the stop
        assert [r for r in resumed.history if r["kind"] == "epoch"][-1]["loss"] == pytest.approx(
            [r for r in straight.history if r["kind"] == "epoch"][-1]["loss"], abs=0)
    # a checkpoint written between log points holds a log window: step 5's holds step 5 (the
    # epoch ended at step 4)
    state = ckpt.load(tmp_path / "straight" / "checkpoints" / "step-000005.pt")
    assert len(state["running"]["window"]) == 1
    resumed, _ = _run(data, make_mlp, tmp_path / "from-5", general=False, max_steps=11,
                      resume=tmp_path / "straight" / "checkpoints" / "step-000005.pt")
    epochs = [[r["loss"] for r in t.history if r["kind"] == "epoch"] for t in (resumed, straight)]
    assert epochs[0] == epochs[1][1:]


def test_two_views_and_a_scheduled_composition_take_the_plain_loop(data, make_mlp, tmp_path):
    """A composition (told the progress: its weight follows a schedule) of nt_xent on two
    untransformed views of a model with dropout and cross-entropy: both loops give the same
    run."""
    def objective():
        ramp = sdk.create("schedule", "cosine_warmup", warmup_steps=6)
        return ramp * sdk.create("objective", "nt_xent") + sdk.create("objective", "cross_entropy")

    def dropout_mlp():  # the views then differ: each is encoded on its own, in view order
        return torch.nn.Sequential(make_mlp(), torch.nn.Dropout(0.2))

    runs = [_run(data, dropout_mlp, tmp_path / str(general), general=general, objective=objective,
                 max_epochs=2, transforms=[None, None]) for general in (False, True)]
    _same_run(*runs[0][:1], *runs[1][:1], runs[0][1], runs[1][1])
    assert runs[0][0]._tells_progress and len(runs[0][0].view_transforms) == 2


@pytest.mark.parametrize("setting", [
    {"accumulate": 2}, {"clip_grad_norm": 1.0}, {"on_nonfinite": "skip"},
    {"reweighter": "reweighter"}, {"teacher": "teacher"}, {"transforms": "noise"},
])
def test_the_general_loop_runs_whenever_the_plain_one_would_skip_something(
        setting, data, make_mlp, monkeypatch):
    from sdk.data import GaussianNoise

    values = {"reweighter": _Even,
              "teacher": _Updates,
              "noise": lambda: GaussianNoise(0.1)}
    kw = {k: values[v]() if v in values else v for k, v in setting.items()}
    plain_calls = []
    original = Trainer._plain_steps
    monkeypatch.setattr(Trainer, "_plain_steps",
                        lambda self, *a: plain_calls.append(1) or original(self, *a))
    trainer = sdk.Trainer(make_mlp(), sdk.create("objective", "cross_entropy"), max_steps=4,
                          progress=False, **kw)
    trainer.fit(DataLoader(data, batch_size=16))
    assert not trainer._plain_loop and not plain_calls and trainer.step == 4
    if "teacher" in kw:
        assert kw["teacher"].updates == 4


def _plain_trainer(make_mlp, objective, **kw):
    return sdk.Trainer(make_mlp(), objective, functools.partial(torch.optim.SGD, lr=0.1),
                       progress=False, **kw)


def test_the_plain_loop_honours_the_objectives_module_hooks(data, make_mlp):
    """The plain loop calls an objective's forward directly only where torch would (no hooks):
    a forward hook, a forward pre-hook, a process-wide hook and one registered during the run
    all run on every step they exist for."""
    loader = DataLoader(data, batch_size=16)
    steps = len(loader)
    objective = sdk.create("objective", "cross_entropy")
    seen = {"pre": 0, "post": 0, "global": 0, "late": 0}
    objective.register_forward_pre_hook(lambda m, args: seen.__setitem__("pre", seen["pre"] + 1))
    objective.register_forward_hook(lambda m, a, out: seen.__setitem__("post", seen["post"] + 1))

    class Late(Callback):  # registers a hook when the second epoch starts
        def on_epoch_start(self, state):
            if state.epoch == 1:
                objective.register_forward_hook(
                    lambda m, a, out: seen.__setitem__("late", seen["late"] + 1))

    def on_any(module, args, out):
        if module is objective:
            seen["global"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(on_any)
    try:
        trainer = _plain_trainer(make_mlp, objective, callbacks=[Late()], max_epochs=2)
        trainer.fit(loader)
    finally:
        handle.remove()
    assert trainer._plain_loop
    assert seen == {"pre": 2 * steps, "post": 2 * steps, "global": 2 * steps, "late": steps}


def test_the_plain_loop_stops_on_the_step_should_stop_is_set(data, make_mlp):
    """A stop requested between log points (here by the objective's forward) ends the run after
    that step, as the general loop's check after every step does."""
    class StopAt(type(sdk.create("objective", "cross_entropy"))):
        trainer = None

        def forward(self, views, batch):
            loss = super().forward(views, batch)
            if self.trainer.state.step == 6:  # the forward of step 7
                self.trainer.should_stop = True
            return loss

    objective = StopAt()
    trainer = _plain_trainer(make_mlp, objective, max_epochs=5, log_every=50)
    objective.trainer = trainer
    trainer.fit(DataLoader(data, batch_size=16))
    assert trainer._plain_loop and trainer.step == 7
