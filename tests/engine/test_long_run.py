"""No leak over a long run: 2 000 steps of a composed objective (``nt_xent`` with a ``queue``
teacher's negatives, ``hard_negative_mixing`` drawing from that queue, plus a weighted
``cross_entropy`` term) keep resident memory and the number of Python objects flat after a
warm-up; the trainer's history grows by its logged records only.

The run is measured in a fresh interpreter (this file run as a script): inside a test worker
that has already run hundreds of other tests, the allocator's state from those tests moves the
resident-memory reading by a few MiB either way."""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import GaussianNoise, IndexedDataset
from sdk.interfaces import Callback

STEPS, WARM_UP, LOG_EVERY = 2000, 300, 100
RSS_BOUND_MIB, OBJECTS_BOUND = 4.0, 100


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


class Meter(Callback):
    """Resident memory and live (gc-tracked) objects after the warm-up step and the last."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[float, int, int]] = {}

    def after_optimizer_step(self, state) -> None:
        if state.step in (WARM_UP, STEPS):
            gc.collect()
            self.at[state.step] = (_rss_mib(), len(gc.get_objects()), len(state.trainer.history))


def measure() -> dict:
    """Train the run and read memory, objects and history after the warm-up and at the end."""
    g = torch.Generator().manual_seed(0)
    n, dim = 256, 8
    y = torch.randint(0, 4, (n,), generator=g)
    data = IndexedDataset(torch.randn(4, dim, generator=g)[y] + torch.randn(n, dim, generator=g), y)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 4))
    objective = sdk.create("objective", "nt_xent", temperature=0.5) + 0.5 * sdk.create(
        "objective", "cross_entropy")
    meter = Meter()
    trainer = sdk.Trainer(
        encoder, objective, functools.partial(torch.optim.SGD, lr=0.01),
        teacher=sdk.create("teacher", "queue", size=64, momentum=0.99),
        sampler=sdk.create("sampler", "hard_negative_mixing", n_hard=16, s=8, s_prime=4,
                           pool="memory", seed=0),
        transforms=GaussianNoise(0.1), callbacks=[meter], max_steps=STEPS, log_every=LOG_EVERY,
        device="cpu", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        trainer.fit(DataLoader(data, batch_size=16, shuffle=True))
    finally:
        torch.set_num_threads(threads)
    (rss0, obj0, hist0), (rss1, obj1, hist1) = meter.at[WARM_UP], meter.at[STEPS]
    return {"step": trainer.step, "seconds": time.perf_counter() - start, "n": n,
            "rss": [rss0, rss1], "objects": [obj0, obj1], "history": [hist0, hist1]}


def test_two_thousand_steps_keep_memory_and_objects_flat():
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    (rss0, rss1), (obj0, obj1), (hist0, hist1) = m["rss"], m["objects"], m["history"]
    logged = (STEPS - WARM_UP) // LOG_EVERY + (STEPS - WARM_UP) // (m["n"] // 16)  # train + epoch
    print(f"{STEPS} steps in {m['seconds']:.1f} s; after step {WARM_UP} -> "
          f"{STEPS}: RSS {rss0:.1f} -> {rss1:.1f} MiB ({rss1 - rss0:+.2f}), objects "
          f"{obj0} -> {obj1} ({obj1 - obj0:+d}), history {hist0} -> {hist1} records")
    assert m["step"] == STEPS
    assert hist1 - hist0 == logged  # the history holds the logged records, nothing per step
    assert rss1 - rss0 < RSS_BOUND_MIB
    assert obj1 - obj0 < OBJECTS_BOUND


if __name__ == "__main__":
    print(json.dumps(measure()))
