"""The engine's contract with its listeners and components: events receive the State and what
they leave there is used; a misnamed event is an error; capabilities are declared on the
interfaces (no probing); validation computes the objective's inputs as training does."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sdk
from sdk import keys
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, Encoder, Objective, Teacher, Transform
from sdk.registry import get_registry
from sdk.types import Batch, Loss, Views

SGD = functools.partial(torch.optim.SGD, lr=0.1)
ENGINE = Path(sdk.__file__).parent / "engine.py"


class SeenCE(Objective):
    """Cross-entropy on the logits; records the views and batches it receives."""

    requires = {"logits": True, "targets": True}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Views, Batch]] = []

    def forward(self, views: Views, batch: Batch) -> Loss:
        self.seen.append((views, batch))
        return Loss(value=F.cross_entropy(views.logits, batch.targets))


def _trainer(make_mlp, objective, **kwargs):
    return sdk.Trainer(make_mlp(), objective, SGD, progress=False, **kwargs)


@pytest.mark.parametrize("where", ["callback", "component"])
def test_a_method_named_like_an_event_that_is_none_fails_at_fit_start(loader, make_mlp, where):
    class Typo(Callback):
        def on_epoch_begin(self, state):
            pass

    class TypoObjective(SeenCE):
        def after_optimiser_step(self, state):
            pass

    if where == "callback":
        trainer = _trainer(make_mlp, SeenCE(), callbacks=[Typo()], max_steps=2)
        name, near = "Typo.on_epoch_begin", "on_epoch_start"
    else:
        trainer = _trainer(make_mlp, TypoObjective(), max_steps=2)
        name, near = "TypoObjective.after_optimiser_step", "after_optimizer_step"
    with pytest.raises(sdk.ConfigError, match=re.escape(name)) as err:
        trainer.fit(loader)
    assert f"closest event: {near!r}" in str(err.value)
    assert trainer.step == 0


def test_a_plugin_hook_named_like_an_event_that_is_none_fails_at_fit_start(loader, make_mlp):
    class Plugin:
        @hookimpl
        def paperplug_on_epoch_begin(self, state):
            pass

    pm = get_registry().plugin_manager
    pm.register(Plugin(), name="typo-plugin")
    try:
        with pytest.raises(sdk.ConfigError, match="typo-plugin.*paperplug_on_epoch_begin.*"
                                                  "paperplug_on_epoch_start"):
            _trainer(make_mlp, SeenCE(), max_steps=2).fit(loader)
    finally:
        pm.unregister(name="typo-plugin")


def test_callbacks_components_and_plugin_hooks_receive_the_state(loader, make_mlp):
    got: list[tuple[str, object]] = []

    class Listening(SeenCE):
        def after_loss(self, state):
            got.append(("component", state))

    class Cb(Callback):
        def after_loss(self, state):
            got.append(("callback", state))

    class Plugin:
        @hookimpl
        def paperplug_after_loss(self, state):
            got.append(("hook", state))

    pm = get_registry().plugin_manager
    pm.register(Plugin(), name="state-plugin")
    try:
        trainer = _trainer(make_mlp, Listening(), callbacks=[Cb()], max_steps=1)
        trainer.fit(loader)
    finally:
        pm.unregister(name="state-plugin")
    assert [who for who, _ in got] == ["component", "callback", "hook"]
    assert all(state is trainer.state for _, state in got)
    state = trainer.state
    assert isinstance(state, State) and state.trainer is trainer and state.model is trainer.model
    assert state.optimizer is trainer.optimizer and state.step == 1 and state.epoch == 0


def test_events_of_an_objectives_terms_fire(loader, make_mlp):
    starts: list[int] = []

    class Term(SeenCE):
        def on_epoch_start(self, state):
            starts.append(state.epoch)

    _trainer(make_mlp, 0.5 * Term() + SeenCE(), max_epochs=2).fit(loader)
    assert starts == [0, 1]


def test_batch_and_views_replaced_after_forward_reach_the_objective(loader, make_mlp):
    objective = SeenCE()

    class Replace(Callback):
        def after_forward(self, state):
            self.views = state.views.evolve(extras={"mark": torch.ones(())})
            self.batch = state.batch.evolve(targets=torch.zeros_like(state.batch.targets))
            state.views, state.batch = self.views, self.batch

    cb = Replace()
    trainer = _trainer(make_mlp, objective, callbacks=[cb], max_steps=3)
    trainer.fit(loader)
    views, batch = objective.seen[-1]
    assert views is cb.views and batch is cb.batch
    assert "mark" in views.extras and int(batch.targets.abs().sum()) == 0
    assert trainer.batch is cb.batch  # what the teacher and later events see


def test_loss_replaced_after_loss_is_what_is_minimised(loader, make_mlp):
    class OnlyBias(Callback):
        """Replaces the loss by the squared distance of the last bias from 5."""

        def after_loss(self, state):
            state.loss = Loss(value=(state.model[2].bias - 5).pow(2).sum())

    trainer = _trainer(make_mlp, SeenCE(), callbacks=[OnlyBias()], max_steps=60)
    weight = trainer.model[0].weight.detach().clone()
    trainer.fit(loader)
    assert torch.allclose(trainer.model[2].bias.detach(), torch.full((3,), 5.0), atol=1e-3)
    assert torch.equal(trainer.model[0].weight, weight)  # the objective's loss was dropped
    assert trainer.history[-1]["loss"] == pytest.approx(0.0, abs=1e-4)


def test_the_engine_does_not_probe_components_for_capabilities():
    source = ENGINE.read_text()
    assert not re.findall(r"\bhasattr\(|\bgetattr\(", source)


class Shift(Transform):
    """A deterministic view: ``x + offset``."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x, batch):
        return x + self.offset, batch


class Frozen(Encoder):
    out_dim = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 4)

    def forward(self, x):
        return self.net(x)


def test_validation_loss_of_a_queue_run_includes_the_queue(data, loader):
    """Item 10: with frozen weights, ``evaluate`` on one batch equals the training path's loss on
    that batch (queue included), and differs from the loss without the queue."""
    queue = sdk.create("teacher", "queue", size=48, momentum=0.9, final_momentum=0.9)
    objective = sdk.create("objective", "nt_xent", temperature=0.5)
    trainer = sdk.Trainer(Frozen(), objective, SGD, teacher=queue,
                          transforms=[Shift(0.0), Shift(0.5)], max_steps=3, progress=False)
    trainer.fit(loader)
    assert int(queue.filled) == 48
    x, y, index = data.tensors[0][:16], data.tensors[1][:16], data.tensors[2][:16]
    one = DataLoader(TensorDataset(x, y, index), batch_size=16)
    val = trainer.evaluate(one)["loss"]
    with torch.no_grad():
        for m in (trainer.encoder, objective, queue):
            m.eval()
        trained = float(trainer._compute(x, Batch(targets=y, index=index)))
        views = trainer.views
        without = float(objective(Views(embeddings=views.embeddings), Batch(targets=y, index=index)).value)
    assert keys.NEGATIVES in views.extras
    assert val == pytest.approx(trained, rel=1e-6)
    assert abs(val - without) > 1e-3


def test_teacher_memory_reaches_evaluate_before_any_fit(data, loader, make_mlp):
    class Memory(Teacher):
        def memory(self):
            return {"offset": torch.tensor(2.0)}

        def update(self, **context):
            pass

    class Offset(SeenCE):
        def forward(self, views, batch):
            return Loss(value=super().forward(views, batch).value + views.extras["offset"])

    trainer = _trainer(make_mlp, Offset(), teacher=Memory(), max_steps=1)
    plain = _trainer(make_mlp, SeenCE(), max_steps=1)
    assert trainer.evaluate(loader)["loss"] == pytest.approx(plain.evaluate(loader)["loss"] + 2.0)


def test_only_declared_teachers_samplers_and_encoders_are_driven(loader, make_mlp):
    with pytest.raises(sdk.ConfigError) as err:
        sdk.Trainer(make_mlp(), SeenCE(), teacher=nn.Linear(2, 2), max_steps=1)
    assert err.value.param == "teacher"
    with pytest.raises(sdk.ConfigError) as err:  # no term declares a sampler slot
        sdk.Trainer(make_mlp(), SeenCE(), sampler=sdk.create("sampler", "label_positives"),
                    max_steps=1)
    assert err.value.param == "sampler"
    with pytest.raises(sdk.RequirementError, match="not an sdk Encoder"):
        _trainer(make_mlp, SeenCE(), max_steps=1).embed(loader, features=True)


def test_a_torch_distributed_sampler_is_told_the_epoch(data, make_mlp):
    epochs: list[int] = []

    class Told(torch.utils.data.DistributedSampler):
        def set_epoch(self, epoch):
            epochs.append(epoch)
            super().set_epoch(epoch)

    sampler = Told(data, num_replicas=1, rank=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)
    _trainer(make_mlp, SeenCE(), max_epochs=3).fit(loader)
    assert epochs == [0, 1, 2]


def test_records_are_validated_on_the_first_micro_batch(loader):
    class Flat(nn.Module):  # returns [B] instead of [B, C]
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(sdk.ShapeError, match="Views.embeddings"):
        sdk.Trainer(Flat(), SeenCE(), SGD, max_steps=2, progress=False).fit(loader)


def test_the_engines_own_records_are_validated_once_per_fit(loader, make_mlp, monkeypatch):
    checks = {"Views": 0, "Batch": 0}
    for cls in (Views, Batch):
        original = cls.__attrs_post_init__

        def counting(self, _original=original, _name=cls.__name__):
            checks[_name] += 1
            _original(self)

        monkeypatch.setattr(cls, "__attrs_post_init__", counting)
    _trainer(make_mlp, SeenCE(), max_steps=8).fit(loader)
    assert checks == {"Views": 1, "Batch": 1}


def test_the_progress_bar_is_redrawn_at_most_every_tenth_of_a_second(monkeypatch):
    from sdk import engine

    class Bar:
        def __init__(self):
            self.advanced = []

        def update(self, task, advance=0, **fields):
            self.advanced.append(advance)

        def stop(self):
            pass

    clock = iter([1.0, 1.05, 1.2, 1.21, 1.25])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    progress = engine._Progress(enabled=True, total=10, plain=True)
    progress.bar = Bar()
    for _ in range(5):
        progress.advance(epoch=0)
    assert progress.bar.advanced == [1, 2]  # at t=1.0 (the first step) and t=1.2
    progress.stop()
    assert progress.bar.advanced == [1, 2, 2]  # the steps since the last redraw


def test_logged_losses_are_the_means_of_the_micro_batch_losses(data, make_mlp):
    seen: list[float] = []

    class Seen(Callback):
        def before_backward(self, state):
            seen.append(state.loss.value.item())

    loader = DataLoader(data, batch_size=10)  # 7 batches an epoch, the last of 4 items
    trainer = _trainer(make_mlp, SeenCE(), callbacks=[Seen()], max_epochs=2, log_every=3)
    trainer.fit(loader)
    train = [r for r in trainer.history if r["kind"] == "train"]
    epochs = [r for r in trainer.history if r["kind"] == "epoch"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    # windows: steps 1-3, 4-6, (7 is cut by the epoch start) 8-9, 10-12
    assert [r["loss"] for r in train] == pytest.approx(
        [sum(seen[0:3]) / 3, sum(seen[3:6]) / 3, sum(seen[7:9]) / 2, sum(seen[9:12]) / 3])
    assert [r["loss"] for r in epochs] == pytest.approx([sum(seen[:7]) / 7, sum(seen[7:]) / 7])
