"""paperplug inside PyTorch Lightning (:class:`sdk.lightning.PaperplugModule`): the same losses
as ``sdk.Trainer.fit`` step for step, the teacher's queue and momentum updates, events at the
matching hooks, and clear errors for what the adapter does not run."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import GaussianNoise, IndexedDataset
from sdk.errors import ConfigError
from sdk.interfaces import Callback

L = pytest.importorskip("lightning", reason="the lightning extra is not installed")
from sdk.lightning import PaperplugModule  # noqa: E402

N, DIM, BATCH, STEPS = 48, 6, 8, 10


class LossLog(Callback):
    """Records each step's loss, the step it belongs to and the events in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.events: list[str] = []

    def on_fit_start(self, state) -> None:
        self.events.append("on_fit_start")

    def on_epoch_start(self, state) -> None:
        self.events.append("on_epoch_start")

    def after_loss(self, state) -> None:
        self.losses.append(float(state.loss.value.detach()))
        self.steps.append(state.step)

    def after_optimizer_step(self, state) -> None:
        self.events.append(f"after_optimizer_step {state.step}")

    def on_epoch_end(self, state) -> None:
        self.events.append("on_epoch_end")

    def on_fit_end(self, state) -> None:
        self.events.append("on_fit_end")


def _data() -> IndexedDataset:
    g = torch.Generator().manual_seed(0)
    return IndexedDataset(torch.randn(N, DIM, generator=g), torch.zeros(N, dtype=torch.long))


def _engine(encoder: nn.Module, log: LossLog, **kwargs) -> sdk.Trainer:
    """SimCLR (nt_xent on two noisy views) with a MoCo queue teacher."""
    return sdk.Trainer(
        encoder, sdk.create("objective", "nt_xent", temperature=0.5),
        functools.partial(torch.optim.AdamW, lr=0.05),
        teacher=sdk.create("teacher", "queue", size=16, momentum=0.9),
        transforms=GaussianNoise(0.3), callbacks=[log], max_steps=STEPS, seed=3,
        progress=False, **kwargs)


def _lightning(max_steps: int = STEPS, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


@pytest.fixture
def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 8))


def test_lightning_gives_the_sdk_trainers_losses_step_for_step(encoder):
    """SimCLR with a queue teacher, 10 steps over more than one epoch: the loss sequence, the
    final weights and the queue's contents equal sdk.Trainer's with the same seed."""
    data = _data()
    sdk_log, pl_log = LossLog(), LossLog()
    reference = _engine(copy.deepcopy(encoder), sdk_log)
    reference.fit(DataLoader(data, batch_size=BATCH))

    engine = _engine(encoder, pl_log)
    module = PaperplugModule(engine)
    # a loader with its own generator, as sdk.Trainer builds: each epoch's iterator then draws
    # its seed from it, not from the global RNG the transforms draw from
    loader = DataLoader(data, batch_size=BATCH, generator=torch.Generator().manual_seed(3))
    _lightning().fit(module, loader)

    assert len(pl_log.losses) == STEPS
    assert pl_log.steps == list(range(STEPS)) == sdk_log.steps
    torch.testing.assert_close(torch.tensor(pl_log.losses), torch.tensor(sdk_log.losses),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(reference.encoder.parameters(), engine.encoder.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ours, theirs = engine.teacher.state_dict(), reference.teacher.state_dict()
    assert ours.keys() == theirs.keys() and int(ours["filled"]) == 16
    for key in ours:  # the momentum encoder and the queue's keys, indices and pointer
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6)
    # the queue filled: without its negatives the losses would differ from the first step on
    assert pl_log.losses[1] != pytest.approx(pl_log.losses[0])


def test_events_fire_at_the_matching_hooks(encoder):
    """6 batches per epoch, 8 steps: on_fit_start, an epoch start/end around steps 1..6, the
    next epoch's start, steps 7..8, on_fit_end (a stop inside the epoch has no epoch end in
    sdk.Trainer; Lightning's loop ends the epoch it stopped in, which the adapter passes on)."""
    log = LossLog()
    module = PaperplugModule(_engine(encoder, log))
    _lightning(max_steps=8).fit(module, DataLoader(_data(), batch_size=BATCH))
    steps = [f"after_optimizer_step {s}" for s in range(1, 9)]
    assert log.events[:2] == ["on_fit_start", "on_epoch_start"]
    assert log.events[2:8] == steps[:6]
    assert log.events[8:10] == ["on_epoch_end", "on_epoch_start"]
    assert log.events[10:12] == steps[6:]
    assert log.events[-1] == "on_fit_end"


def test_schedule_and_stop_reach_lightning(encoder):
    """An sdk Schedule drives the LR every step; should_stop set in after_optimizer_step ends
    Lightning's loop."""

    class StopAt(Callback):
        def after_optimizer_step(self, state) -> None:
            if state.step == 3:
                state.trainer.should_stop = True

    log = LossLog()
    engine = sdk.Trainer(encoder, sdk.create("objective", "nt_xent", temperature=0.5),
                         functools.partial(torch.optim.SGD, lr=0.1),
                         scheduler=sdk.create("schedule", "cosine_warmup", warmup_steps=2),
                         transforms=GaussianNoise(0.3), callbacks=[log, StopAt()],
                         max_steps=STEPS, progress=False)
    lrs: list[float] = []

    class LR(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _lightning(callbacks=[LR()]).fit(PaperplugModule(engine), DataLoader(_data(), batch_size=BATCH))
    assert len(log.losses) == 3
    schedule = sdk.create("schedule", "cosine_warmup", warmup_steps=2)
    assert lrs == pytest.approx([0.1 * schedule(s, STEPS) for s in range(3)])


def test_validation_step_logs_the_objectives_loss(encoder):
    engine = _engine(encoder, LossLog())
    pl = _lightning(max_steps=2, limit_val_batches=1, val_check_interval=2)
    pl.fit(PaperplugModule(engine), DataLoader(_data(), batch_size=BATCH),
           DataLoader(_data(), batch_size=BATCH))
    x, _, _ = next(iter(DataLoader(_data(), batch_size=BATCH)))
    assert "val_loss" in pl.callback_metrics
    assert torch.isfinite(pl.callback_metrics["val_loss"])


def test_unsupported_settings_are_clear_errors(encoder):
    with pytest.raises(ConfigError, match="accumulate_grad_batches"):
        _lightning(accumulate_grad_batches=2).fit(PaperplugModule(_engine(encoder, LossLog())),
                                                  DataLoader(_data(), batch_size=BATCH))

    class Logs(Callback):
        def on_log(self, state) -> None:
            pass

    engine = sdk.Trainer(encoder, sdk.create("objective", "nt_xent"), callbacks=[Logs()],
                         transforms=GaussianNoise(0.3), max_steps=2, progress=False)
    with pytest.raises(ConfigError, match="on_log"):
        _lightning().fit(PaperplugModule(engine), DataLoader(_data(), batch_size=BATCH))
    with pytest.raises(ConfigError, match="sdk.Trainer"):
        PaperplugModule(object())
    semi = sdk.Trainer(nn.Linear(DIM, 3), sdk.create("objective", "fixmatch"), max_steps=2,
                       progress=False)
    with pytest.raises(ConfigError, match="unlabelled"):
        _lightning().fit(PaperplugModule(semi), DataLoader(_data(), batch_size=BATCH))
