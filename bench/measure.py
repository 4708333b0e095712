"""What the loss benchmarks share: device syncs, the peak memory of one call (CUDA's
allocator, or the process's resident-set high-water mark on the CPU) and running a benchmark's
``--memory`` mode in a fresh process."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], None], device: torch.device) -> float:
    """Seconds of one ``call`` after a garbage collection, the device synchronised on both
    sides (CUDA kernels run asynchronously)."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(steps: Sequence[tuple[str, Callable[[], None]]], device: torch.device,
                        rounds: int) -> dict[str, float]:
    """Median seconds of each named step over ``rounds`` rounds, after one warm-up call each;
    the steps run in turn, in reverse order every other round (drifting machine load hits all
    alike)."""
    for _, step in steps:
        step()
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for r in range(rounds):
        for name, step in (steps if r % 2 == 0 else steps[::-1]):
            times[name].append(timed(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _rss() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def peak_bytes(call: Callable[[], None], device: torch.device) -> int:
    """Bytes ``call`` adds at its peak over what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _rss()["VmRSS"]
    call()
    return _rss()["VmHWM"] - before


def child_peak_memory(module: str, size: int | str) -> dict[str, int]:
    """``python -m <module> --memory <size>`` in a fresh process (its allocator returns freed
    memory promptly, so one case's peak does not hide the next's); the JSON it prints last."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", module, "--memory", str(size)],
                         cwd=Path(__file__).resolve().parents[1], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
