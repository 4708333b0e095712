"""A plugin that raises during ``fit`` is named: a PluginFailure carries its name, kind and the
event or call it failed in, chains the original exception, and the run's last checkpoint still
resumes to the uninterrupted result."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk import checkpoint as ckpt
from sdk.data import Compose, GaussianNoise
from sdk.errors import PluginFailure, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback, Input, Objective, Sampler, Transform
from sdk.registry import get_registry
from sdk.types import Batch, Loss, Pairs, Views

SGD = functools.partial(torch.optim.SGD, lr=0.1)


class Boom(Exception):
    """The fault the tests inject."""


class CE(Objective):
    requires = {"logits": True, "targets": True}

    def forward(self, views: Views, batch: Batch) -> Loss:
        return Loss(value=F.cross_entropy(views.logits, batch.targets))


class Exploding(CE):
    def forward(self, views: Views, batch: Batch) -> Loss:
        return self._inner(views)

    def _inner(self, views: Views) -> Loss:
        raise Boom("the term broke")


def _raising_callback(event: str, exc: Exception, step: int = 0) -> Callback:
    def fire(self, state):
        if state.step >= step:
            raise exc

    return type("Faulty", (Callback,), {event: fire})()


def _fit(make_mlp, loader, objective=None, **kwargs) -> sdk.Trainer:
    kwargs.setdefault("max_steps", 3)
    trainer = sdk.Trainer(make_mlp(), objective or CE(), SGD, progress=False, **kwargs)
    return trainer.fit(loader)


def _failure(make_mlp, loader, **kwargs) -> PluginFailure:
    with pytest.raises(PluginFailure) as err:
        _fit(make_mlp, loader, **kwargs)
    return err.value


@pytest.mark.parametrize("event", ["on_fit_start", "on_epoch_start", "after_forward", "after_loss",
                                   "before_backward", "before_optimizer_step",
                                   "after_optimizer_step", "on_epoch_end", "on_fit_end"])
def test_a_callback_failing_in_an_event_is_named_with_the_event(loader, make_mlp, event):
    cause = Boom("no good")
    failure = _failure(make_mlp, loader, max_steps=None, max_epochs=1,
                       callbacks=[_raising_callback(event, cause)])
    assert (failure.plugin, failure.kind, failure.where) == ("Faulty", "callback", event)
    assert failure.__cause__ is cause
    assert str(failure) == f"callback 'Faulty' failed in event {event!r}: Boom: no good"


def test_a_registered_callback_is_named_by_its_registry_name(loader, make_mlp, monkeypatch):
    sam = sdk.create("callback", "sam", rho=0.1)

    def broken(self, state):
        raise Boom("sam broke")

    monkeypatch.setattr(type(sam), "before_optimizer_step", broken)
    failure = _failure(make_mlp, loader, callbacks=[sam])
    assert (failure.plugin, failure.kind, failure.where) == ("sam", "callback",
                                                             "before_optimizer_step")


def test_a_component_listener_is_named(loader, make_mlp):
    class Listening(CE):
        def after_loss(self, state):
            raise Boom("listener")

    failure = _failure(make_mlp, loader, objective=Listening())
    assert (failure.plugin, failure.kind, failure.where) == ("listening", "objective",
                                                             "after_loss")


def test_a_plugin_modules_hook_is_named(loader, make_mlp):
    class Module:
        @hookimpl
        def paperplug_on_epoch_end(self, state):
            raise Boom("hook")

    pm = get_registry().plugin_manager
    pm.register(Module(), name="faulty-module")
    try:
        failure = _failure(make_mlp, loader, max_steps=None, max_epochs=1)
    finally:
        pm.unregister(name="faulty-module")
    assert (failure.plugin, failure.kind, failure.where) == ("faulty-module", "hook",
                                                             "on_epoch_end")
    assert isinstance(failure.__cause__, Boom)


def test_the_failing_term_of_a_weighted_sum_is_named(loader, make_mlp):
    objective = 0.5 * sdk.create("objective", "cross_entropy") + Exploding()
    failure = _failure(make_mlp, loader, objective=objective)
    assert (failure.plugin, failure.kind, failure.where) == ("exploding", "objective", "forward")
    assert str(failure.__cause__) == "the term broke"


class Pair2(Objective):
    """A pair objective with a sampler slot (the sampler's masks feed the loss)."""

    requires = {"views": 2}
    accepts_sampler = True
    consumes = frozenset({Input.PAIRS})

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = torch.cat(views.embeddings)
        pairs = self.sampler.pairs(views, batch)
        sims = z @ z.T
        return Loss(value=(sims * pairs.negative).mean() - (sims * pairs.positive).mean())


class BrokenSampler(Sampler):
    produces = frozenset({Input.PAIRS})

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        return self._masks(views)

    def _masks(self, views: Views) -> Pairs:
        raise Boom("masks")


def test_a_pair_sampler_called_by_the_objective_is_named(loader, make_mlp):
    failure = _failure(make_mlp, loader, objective=Pair2(), sampler=BrokenSampler(),
                       transforms=GaussianNoise(0.1))
    assert (failure.plugin, failure.kind, failure.where) == ("BrokenSampler", "sampler", "pairs")


def test_a_registered_sampler_and_teacher_are_named_by_their_registry_names(
        loader, make_mlp, monkeypatch):
    import plugins.contrastive.hard_negative_mixing as hnm

    def broken(*args, **kwargs):
        raise Boom("draw")

    monkeypatch.setattr(hnm, "_draw", broken)
    sampler = sdk.create("sampler", "hard_negative_mixing", n_hard=4, s=4, s_prime=2, pool="batch")
    failure = _failure(make_mlp, loader, objective=sdk.create("objective", "nt_xent"),
                       sampler=sampler, transforms=GaussianNoise(0.1))
    assert (failure.plugin, failure.kind, failure.where) == ("hard_negative_mixing", "sampler",
                                                             "pairs")


def update(self, **kwargs):
    raise Boom("update")


def observe(self, **kwargs):
    raise Boom("observe")


def memory(self):
    raise Boom("memory")


_BROKEN_TEACHER = {"update": update, "observe": observe, "memory": memory}


@pytest.mark.parametrize("method", ["update", "observe", "memory"])
def test_a_teacher_failing_in_update_observe_or_memory_is_named(loader, make_mlp, monkeypatch,
                                                               method):
    teacher = sdk.create("teacher", "queue", size=32, momentum=0.9)
    monkeypatch.setattr(type(teacher), method, _BROKEN_TEACHER[method])
    failure = _failure(make_mlp, loader, objective=sdk.create("objective", "nt_xent"),
                       teacher=teacher, transforms=GaussianNoise(0.1))
    assert (failure.plugin, failure.kind, failure.where) == ("queue", "teacher", method)
    assert str(failure.__cause__) == method


def test_a_transform_inside_compose_is_named(loader, make_mlp):
    class Faulty(Transform):
        def forward(self, x, batch):
            raise Boom("view")

    failure = _failure(make_mlp, loader, transforms=Compose([GaussianNoise(0.1), Faulty()]))
    assert (failure.plugin, failure.kind, failure.where) == ("Faulty", "transform", "forward")


def test_validation_errors_and_failures_keep_their_type(loader, make_mlp):
    shape = ShapeError("the plugin's own check")
    with pytest.raises(ShapeError) as err:
        _fit(make_mlp, loader, callbacks=[_raising_callback("after_loss", shape)])
    assert err.value is shape
    already = PluginFailure("inner", plugin="p", kind="callback", where="after_loss")
    with pytest.raises(PluginFailure) as err:
        _fit(make_mlp, loader, callbacks=[_raising_callback("after_loss", already)])
    assert err.value is already  # not wrapped twice


def test_an_error_outside_every_plugin_is_not_wrapped(loader, make_mlp):
    class Encoder(nn.Module):  # the user's own model is no plugin
        def forward(self, x):
            raise Boom("model")

    trainer = sdk.Trainer(Encoder(), CE(), SGD, progress=False, max_steps=2)
    trainer.encoder.register_parameter("w", nn.Parameter(torch.zeros(1)))
    with pytest.raises(Boom):
        trainer.fit(loader)


def test_the_last_checkpoint_survives_a_failure_and_resumes_exactly(tmp_path, make_mlp, data):
    def run(run_dir, callbacks=(), resume=False, steps=8):
        torch.manual_seed(0)
        trainer = sdk.Trainer(make_mlp(), CE(), functools.partial(torch.optim.AdamW, lr=0.01),
                              progress=False, max_steps=steps, checkpoint_every=2,
                              run_dir=run_dir, log_every=1, callbacks=list(callbacks))
        return trainer.fit(DataLoader(data, batch_size=16, shuffle=True), resume=resume)

    reference = run(tmp_path / "reference")
    faulty = _raising_callback("after_optimizer_step", Boom("late"), step=5)
    with pytest.raises(PluginFailure, match="after_optimizer_step"):
        run(tmp_path / "run", callbacks=[faulty])
    files = ckpt.checkpoint_files(tmp_path / "run" / "checkpoints")
    assert files[0].name == "step-000004.pt"  # step 5 failed before its checkpoint was due
    assert ckpt.load(files[0])["position"]["step"] == 4  # checksum verified
    resumed = run(tmp_path / "run", resume=True)
    assert resumed.step == reference.step == 8
    for p, q in zip(resumed.encoder.parameters(), reference.encoder.parameters()):
        assert torch.equal(p, q)


def test_a_failed_collective_is_not_blamed_on_the_plugin_that_called_it(loader, make_mlp):
    """A collective raises when a peer died; the plugin calling it is not at fault (here: no
    process group, which torch.distributed reports the same way)."""

    class Gathering(Callback):
        def after_loss(self, state):
            torch.distributed.all_reduce(torch.zeros(1))

    with pytest.raises(Exception) as err:
        _fit(make_mlp, loader, callbacks=[Gathering()])
    assert not isinstance(err.value, PluginFailure)
    assert "process group" in str(err.value)
