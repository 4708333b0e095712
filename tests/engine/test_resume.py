"""Checkpoints: atomic writes, what they hold, and exact resume after a SIGKILL."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import sdk
from sdk import checkpoint as ckpt
from sdk.data import GaussianNoise
from sdk.interfaces import Callback

SCRIPT = Path(__file__).with_name("resume_script.py")
ROOT = Path(sdk.__file__).parent.parent


def _launch(run_dir: Path, mode: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out


def _reference_in_process(run_dir: Path) -> None:
    """The uninterrupted run, in this process (one torch start-up fewer)."""
    spec = importlib.util.spec_from_file_location("resume_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    run_dir.mkdir()
    try:
        module.main(run_dir, "full")
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    victim = _launch(run_dir, "hang")
    _reference_in_process(ref_dir)  # while the victim starts up
    deadline = time.monotonic() + 120
    while not (run_dir / "hanging").exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    state = ckpt.load(run_dir / "checkpoints" / "step-000006.pt")
    assert state["position"] == {"epoch": 1, "batch": 4, "step": 6}  # mid-epoch
    assert not (run_dir / "final.pt").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000003.pt", "step-000004.pt", "step-000006.pt"]  # the newest 3, no temp files

    _finish(_launch(run_dir, "resume"))
    a, b = torch.load(ref_dir / "final.pt"), torch.load(run_dir / "final.pt")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 3)
    for part in ("encoder", "teacher", "objective"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert any(k.startswith("target.") for k in a["teacher"])  # the EMA target resumed
    assert int(a["objective"]["seen"].sum()) == 3 * 60  # per-sample buffers resumed
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the log of the resumed run continues the interrupted one exactly
    assert _records(run_dir) == _records(ref_dir)


def _fit(data, make_mlp, run_dir, *, epochs, resume=False):
    enc = make_mlp()
    teacher = sdk.create("teacher", "ema", momentum=0.5, final_momentum=0.5)  # no schedule
    trainer = sdk.Trainer(
        enc, sdk.create("objective", "cross_entropy"),
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), teacher=teacher,
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2),
        max_epochs=epochs, run_dir=run_dir, progress=False)
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True), resume=resume)
    return trainer


def test_resume_at_an_epoch_boundary_in_process(data, make_mlp, tmp_path):
    full = _fit(data, make_mlp, tmp_path / "full", epochs=3)
    _fit(data, make_mlp, tmp_path / "split", epochs=1)
    resumed = _fit(data, make_mlp, tmp_path / "split", epochs=3, resume=True)
    assert resumed.step == full.step == 12
    for p, q in zip(full.encoder.state_dict().values(), resumed.encoder.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(full.teacher.state_dict().values(), resumed.teacher.state_dict().values()):
        assert torch.equal(p, q)
    assert resumed.scheduler.last_epoch == 12


def test_checkpoint_holds_everything_a_resume_needs(data, make_mlp, tmp_path):
    trainer = _fit(data, make_mlp, tmp_path, epochs=1)
    state = ckpt.load(tmp_path / "checkpoints" / "step-000004.pt")
    assert state["position"] == {"epoch": 1, "batch": 0, "step": 4}
    assert set(state["components"]) >= {"encoder", "objective", "teacher"}
    assert "target.0.weight" in state["components"]["teacher"]
    assert state["optimizer"]["state"]  # momentum buffers
    assert state["scheduler"]["last_epoch"] == 4
    assert state["scaler"] is None
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert state["running"]["epoch_count"] == 4 and state["running"]["epoch_sum"].shape == ()
    assert state["running"]["window"].shape == (4,)  # 4 losses since the last log point
    assert trainer.checkpoint_path == tmp_path / "checkpoints" / "step-000004.pt"


def test_resume_from_a_missing_path_fails_clearly(data, make_mlp, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _fit(data, make_mlp, None, epochs=1, resume=tmp_path / "nowhere.pt")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c" / "last.pt"
    ckpt.save({"w": torch.ones(3)}, path)
    real_save = torch.save

    def torn(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(ckpt.load(path)["w"], torch.ones(3))  # the previous checkpoint survives
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(()))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(()))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class _EpochEnds(Callback):
    def __init__(self) -> None:
        self.ends: list[int] = []

    def on_epoch_end(self, state) -> None:
        self.ends.append(state.epoch)


def _fit_steps(data, make_mlp, run_dir, *, max_steps, resume=False):
    enc, ends = make_mlp(), _EpochEnds()
    trainer = sdk.Trainer(
        enc, sdk.create("objective", "cross_entropy"),
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), transforms=GaussianNoise(0.3),
        callbacks=[ends], max_steps=max_steps, run_dir=run_dir, log_every=1, progress=False)
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True), resume=resume)
    return trainer, ends.ends


def test_max_steps_mid_epoch_then_resume_with_more_steps_is_bitwise_exact(data, make_mlp, tmp_path):
    """64 samples in batches of 16: 4 steps an epoch. Stopping at step 6 is inside epoch 1; a
    resume to step 10 must continue epoch 1 with its third batch, as a straight run does."""
    full, full_ends = _fit_steps(data, make_mlp, tmp_path / "full", max_steps=10)
    stopped, stopped_ends = _fit_steps(data, make_mlp, tmp_path / "split", max_steps=6)
    assert stopped_ends == [0]  # epoch 1 is not over: no on_epoch_end for it
    assert (stopped.epoch, stopped.batch_idx, stopped.step) == (1, 2, 6)
    state = ckpt.load(tmp_path / "split" / "checkpoints" / "step-000006.pt")
    assert state["position"] == {"epoch": 1, "batch": 2, "step": 6}
    last = stopped.history[-1]
    assert last["kind"] == "epoch" and last["partial"] and last["epoch"] == 1
    resumed, resumed_ends = _fit_steps(data, make_mlp, tmp_path / "split", max_steps=10,
                                       resume=True)
    assert resumed_ends == [1] and full_ends == [0, 1]
    assert (resumed.epoch, resumed.batch_idx, resumed.step) == (full.epoch, full.batch_idx, 10)
    for p, q in zip(full.encoder.state_dict().values(), resumed.encoder.state_dict().values()):
        assert torch.equal(p, q)
    assert _records(tmp_path / "split") == _records(tmp_path / "full")
