"""Checkpoints under faults: damaged files, a kill between write and rename, a full disk, a
changed model, and files crafted to run code when unpickled."""

from __future__ import annotations

import errno
import functools
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk import checkpoint as ckpt
from sdk.data import IndexedDataset
from sdk.errors import CheckpointError, CheckpointWarning, ConfigError
from sdk.interfaces import Callback

ROOT = Path(sdk.__file__).parent.parent


def _data() -> IndexedDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (64,), generator=g)
    return IndexedDataset(torch.randn(3, 8, generator=g)[y] + torch.randn(64, 8, generator=g), y)


def _mlp(hidden: int = 16, depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, hidden), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(hidden, 3))


def _trainer(run_dir, *, hidden=16, depth=1, teacher=False, callbacks=(), scheduler=None,
             **settings):
    settings = {"max_epochs": 3, "progress": False, "device": "cpu", **settings}
    return sdk.Trainer(_mlp(hidden, depth), sdk.create("objective", "cross_entropy"),
                       functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                       teacher=sdk.create("teacher", "ema", momentum=0.5, final_momentum=0.5)
                       if teacher else None, callbacks=callbacks, scheduler=scheduler,
                       run_dir=run_dir, **settings)


def _fit(run_dir, *, resume=False, **kwargs):
    trainer = _trainer(run_dir, **kwargs)
    trainer.fit(DataLoader(_data(), batch_size=16, shuffle=True), resume=resume)
    return trainer


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# retention -----------------------------------------------------------------------------------


def test_the_newest_keep_checkpoints_are_kept(tmp_path):
    _fit(tmp_path, max_epochs=None, max_steps=10, checkpoint_every=2, keep_checkpoints=2)
    assert _names(tmp_path) == ["step-000008.pt", "step-000010.pt"]
    _fit(tmp_path / "default", max_epochs=None, max_steps=10, checkpoint_every=2)
    assert _names(tmp_path / "default") == ["step-000006.pt", "step-000008.pt", "step-000010.pt"]


def test_keep_checkpoints_must_be_at_least_one(tmp_path):
    with pytest.raises(ConfigError, match="keep_checkpoints: must be >= 1, got 0"):
        _trainer(tmp_path, keep_checkpoints=0)


def test_a_fresh_run_replaces_the_checkpoints_of_a_previous_one(tmp_path):
    _fit(tmp_path)  # steps 4, 8, 12
    _fit(tmp_path, max_epochs=None, max_steps=2, checkpoint_every=1)
    assert _names(tmp_path) == ["step-000001.pt", "step-000002.pt"]


# damaged files -------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_byte(path: Path) -> None:
    """Change one byte of a tensor's data: the archive stays readable, the values change."""
    raw = bytearray(path.read_bytes())
    weight = ckpt.load(path)["components"]["encoder"]["0.weight"]
    at = raw.find(weight.numpy().tobytes()[:32])
    assert at > 0
    raw[at + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(path, weights_only=True)["state"]["components"]["encoder"]
                           ["0.weight"], weight)  # torch itself does not notice


DAMAGE = {
    "truncated": (_truncate, "is truncated"),
    "checksum": (_flip_a_weight_byte, "checksum mismatch"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "garbage": (lambda p: p.write_bytes(random.Random(0).randbytes(4096)),
                "is truncated or not a checkpoint"),
    "foreign": (lambda p: torch.save({"encoder": torch.ones(3)}, p), "no checksum"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_and_reproduces_the_run(tmp_path, damage):
    full = _fit(tmp_path / "full")
    run = tmp_path / "damaged"
    _fit(run)
    assert _names(run) == ["step-000004.pt", "step-000008.pt", "step-000012.pt"]
    spoil, reason = DAMAGE[damage]
    spoil(run / "checkpoints" / "step-000012.pt")
    with pytest.warns(CheckpointWarning, match=f"step-000012.pt .*{reason}") as caught:
        resumed = _fit(run, resume=True)
    # exactly one file skipped (torch may add its own warnings about the garbage)
    assert len([w for w in caught if issubclass(w.category, CheckpointWarning)]) == 1
    assert resumed._start_step == 8  # from the newest valid checkpoint
    assert resumed.step == 12 and _same_weights(resumed.encoder, full.encoder)
    ckpt.load(run / "checkpoints" / "step-000012.pt")  # rewritten, valid


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    _fit(tmp_path, max_epochs=2)
    _truncate(tmp_path / "checkpoints" / "step-000008.pt")
    _flip_a_weight_byte(tmp_path / "checkpoints" / "step-000004.pt")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as err:
        _fit(tmp_path, resume=True)
    message = str(err.value)
    assert message.startswith(f"no valid checkpoint in {tmp_path / 'checkpoints'}: ")
    assert "step-000008.pt is truncated" in message and "step-000004.pt is corrupted" in message


def test_resume_from_a_named_damaged_file_does_not_fall_back(tmp_path):
    _fit(tmp_path, max_epochs=2)
    _truncate(tmp_path / "checkpoints" / "step-000008.pt")
    with pytest.raises(CheckpointError, match="step-000008.pt is truncated"):
        _fit(tmp_path, resume=tmp_path / "checkpoints" / "step-000008.pt")


def test_resume_from_a_run_directory_without_checkpoints_fails_clearly(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        _fit(None, resume=tmp_path)


# a kill between writing and renaming ---------------------------------------------------------

_KILL_AT_RENAME = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {here!r})
import test_checkpoint_faults as t
from sdk import checkpoint
run_dir = Path(sys.argv[1])
real = os.replace

def replace(src, dst):
    if Path(dst).name == "step-000004.pt":  # the new checkpoint is written and flushed
        (run_dir / "renaming").write_text(str(src))
        time.sleep(600)
    real(src, dst)

checkpoint.os.replace = replace
t._fit(run_dir, max_epochs=None, max_steps=6, checkpoint_every=2)
"""


def test_a_kill_between_write_and_rename_leaves_the_previous_checkpoint(tmp_path):
    run = tmp_path / "killed"
    run.mkdir()
    script = _KILL_AT_RENAME.format(here=str(Path(__file__).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    victim = subprocess.Popen([sys.executable, "-c", script, str(run)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    straight = _fit(tmp_path / "straight", max_epochs=None, max_steps=6, checkpoint_every=2)
    deadline = time.monotonic() + 120
    while not (run / "renaming").exists():
        assert victim.poll() is None, victim.communicate()[0]
        assert time.monotonic() < deadline, "the run never reached the rename"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    temp = Path((run / "renaming").read_text())
    assert temp.exists() and temp.parent == run / "checkpoints"  # the new file, never renamed
    assert _names(run) == sorted(["step-000002.pt", temp.name])
    assert ckpt.checkpoint_files(run / "checkpoints") == [run / "checkpoints" / "step-000002.pt"]
    assert ckpt.load(run / "checkpoints" / "step-000002.pt")["position"]["step"] == 2

    resumed = _fit(run, resume=True, max_epochs=None, max_steps=6, checkpoint_every=2)
    assert resumed._start_step == 2 and resumed.step == 6
    assert _same_weights(resumed.encoder, straight.encoder)
    assert _names(run) == ["step-000002.pt", "step-000004.pt", "step-000006.pt"]  # temp removed


# a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj["state"]["position"]["step"] == 4:
            f.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError) as err:
        _fit(tmp_path, max_epochs=None, max_steps=6, checkpoint_every=2)
    target = tmp_path / "checkpoints" / "step-000004.pt"
    assert str(err.value).startswith(f"cannot write checkpoint {target}: the disk is full")
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert _names(tmp_path) == ["step-000002.pt"]  # no partial file left
    assert ckpt.load(tmp_path / "checkpoints" / "step-000002.pt")["position"]["step"] == 2

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes from step 2
    resumed = _fit(tmp_path, resume=True, max_epochs=None, max_steps=6, checkpoint_every=2)
    assert resumed._start_step == 2 and resumed.step == 6


# a changed model -----------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "expected"), [
    ({"hidden": 32}, "encoder: shape mismatch: 0.weight (checkpoint [16, 8], now [32, 8]), "
                     "0.bias (checkpoint [16], now [32]), 2.weight (checkpoint [3, 16], now "
                     "[3, 32])"),
    ({"depth": 2}, "encoder: missing from the checkpoint: 4.weight, 4.bias; shape mismatch: "
                   "2.weight (checkpoint [3, 16], now [16, 16]), 2.bias (checkpoint [3], now [16])"),
    ({"teacher": True}, "components of this trainer missing from the checkpoint: teacher"),
])
def test_resume_into_a_changed_model_names_the_keys_before_loading_anything(tmp_path, change,
                                                                             expected):
    _fit(tmp_path, max_epochs=1)
    trainer = _trainer(tmp_path, **change)
    before = {k: v.clone() for k, v in trainer.encoder.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        trainer.fit(DataLoader(_data(), batch_size=16, shuffle=True), resume=True)
    assert str(err.value) == (f"checkpoint {tmp_path / 'checkpoints' / 'step-000004.pt'} does not "
                              f"match this trainer (did the model or plugins change?): {expected}")
    assert all(torch.equal(before[k], v) for k, v in trainer.encoder.state_dict().items())


def test_a_plugin_removed_since_the_checkpoint_is_named(tmp_path):
    _fit(tmp_path, max_epochs=1, teacher=True)
    with pytest.raises(CheckpointError,
                       match="components in the checkpoint but not in this trainer: teacher$"):
        _fit(tmp_path, resume=True)


def test_a_renamed_layer_is_named_both_ways(tmp_path):
    _fit(tmp_path, max_epochs=1)
    trainer = _trainer(tmp_path)
    trainer.encoder = nn.Sequential()
    trainer.encoder.add_module("inp", nn.Linear(8, 16))
    trainer.encoder.add_module("act", nn.Tanh())
    trainer.encoder.add_module("2", nn.Linear(16, 3))
    with pytest.raises(CheckpointError, match="encoder: missing from the checkpoint: inp.weight, "
                                              "inp.bias; not in this model: 0.weight, 0.bias$"):
        trainer.fit(DataLoader(_data(), batch_size=16, shuffle=True), resume=True)


def test_stateless_callbacks_may_come_and_go(tmp_path):
    _fit(tmp_path, max_epochs=1, callbacks=[Callback()])
    assert _fit(tmp_path, resume=True, max_epochs=2).step == 8  # one fewer
    assert _fit(tmp_path, resume=True, callbacks=[Callback(), Callback()]).step == 12  # more


# safe loading --------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _plant(path: Path, marker: Path, how: str) -> None:
    payload = {"format": ckpt.FORMAT, "sha256": "0" * 64, "state": {"x": _RunsCode(marker)}}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # what torch.load reads as legacy


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    _fit(tmp_path, max_epochs=1)
    planted, alone = tmp_path / "checkpoints" / "step-000099.pt", tmp_path / "alone" / "step-1.pt"
    alone.parent.mkdir()
    _plant(planted, marker, how)
    _plant(alone, marker, how)
    with pytest.warns(CheckpointWarning, match="step-000099.pt refused: it holds objects other "
                                               "than tensors.*Unsupported global"):
        resumed = _fit(tmp_path, resume=True, max_epochs=2)
    assert resumed._start_step == 4 and not marker.exists()
    assert not planted.exists()  # a later step than the run's: removed at its next checkpoint
    with pytest.raises(CheckpointError, match="step-1.pt refused"):
        _fit(tmp_path / "other", resume=alone)
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*step-1.pt refused"), \
            pytest.warns(CheckpointWarning):
        _fit(tmp_path / "other", resume=alone.parent)
    assert not marker.exists()
    pickle.loads(alone.read_bytes()) if how == "pickle" else torch.load(alone, weights_only=False)
    assert marker.read_text() == "code ran"  # the file really is malicious


def test_only_tensors_numbers_strings_and_containers_are_saved(tmp_path):
    class Holds(Callback):
        def state_dict(self):
            return {"ok": [1, 2.5, "s", None, (torch.ones(2), {"k": True})], "bad": np.float32(1)}

    with pytest.raises(CheckpointError, match=r"components\.callbacks\.0\.bad holds a "
                                              r"numpy\.float32; a checkpoint holds tensors"):
        _fit(tmp_path, max_epochs=1, callbacks=[Holds()])
    assert not (tmp_path / "checkpoints").exists()  # nothing written, not even a temporary file


def test_the_engine_state_is_plain_and_its_checksum_covers_every_value(tmp_path):
    trainer = _fit(tmp_path, max_epochs=1, teacher=True,
                   scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2))
    state = trainer.state_dict()
    reference = ckpt.digest(state)  # raises on anything but tensors and plain containers
    state["optimizer"]["param_groups"][0]["lr"] *= 1.0000001
    assert ckpt.digest(state) != reference
    state = trainer.state_dict()
    state["rng"][0]["torch"][5] ^= 1
    assert ckpt.digest(state) != reference
