"""Multi-process faults under ``torchrun`` (2 gloo CPU ranks, elastic agent): a rank SIGKILLed
mid-epoch is restarted and the run ends exactly as an uninterrupted one; a rank that raises
stops every rank, with its error named, instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sdk

SCRIPT = Path(__file__).with_name("elastic_script.py")
ROOT = Path(sdk.__file__).parent.parent
TIMEOUT_S = 90
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, mode: str, *, restarts: int) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "--monitor-interval", "0.1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--local-addr", "127.0.0.1",
           str(SCRIPT), str(run_dir), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{out[-4000:]}")
    return proc.returncode, out


def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_a_rank_sigkilled_mid_epoch_restarts_and_ends_as_the_uninterrupted_run(tmp_path):
    start = time.monotonic()
    reference = _torchrun(tmp_path / "reference", "full", restarts=0)
    killed = _torchrun(tmp_path / "killed", "kill", restarts=1)
    (rc_ref, out_ref), (rc, out) = _finish(reference), _finish(killed)
    print(f"two torchrun runs (one restarted) in {time.monotonic() - start:.1f} s")
    assert rc_ref == 0, out_ref[-4000:]
    assert rc == 0, out[-4000:]
    assert (tmp_path / "killed" / "killed").read_text() == "8"  # rank 1 died inside step 8
    ref = torch.load(tmp_path / "reference" / "final_rank0.pt")
    assert (ref["step"], ref["epoch"], ref["world"], ref["first_step"]) == (18, 3, 2, 0)
    for rank in (0, 1):
        got = torch.load(tmp_path / "killed" / f"final_rank{rank}.pt")
        # the restarted processes resumed from a checkpoint of the first attempt (step 8, or 6
        # when rank 0 was stopped while writing step 8's)
        assert got["first_step"] in (6, 8)
        _assert_same({k: v for k, v in ref.items() if k != "first_step"},
                     {k: v for k, v in got.items() if k != "first_step"}, f"rank {rank}")
    assert _records(tmp_path / "killed") == _records(tmp_path / "reference")


def test_a_rank_that_raises_stops_every_rank_with_its_error_named(tmp_path):
    start = time.monotonic()
    rc, out = _finish(_torchrun(tmp_path / "run", "raise", restarts=0))
    elapsed = time.monotonic() - start
    print(f"torchrun stopped both ranks {elapsed:.1f} s after launch (rc {rc})")
    assert rc != 0
    assert ("sdk.errors.PluginFailure: callback 'Fault' failed in event 'after_forward': "
            "Boom: rank 1 gave up at step 3") in out
    assert not list((tmp_path / "run").glob("final_rank*.pt"))  # neither rank went on
