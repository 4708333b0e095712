"""Engine overhead: ``sdk.Trainer`` against a hand-written PyTorch loop.

Both train the same model on the same data with the same loss (cross-entropy; the Trainer
through the ``cross_entropy`` objective, which also returns the per-sample losses a
reweighter needs) and optimizer (SGD with momentum) for the same number of steps, in one
process, one thread, in pairs of rounds (the two loops back to back, which one first
alternating), so that a slow phase of a shared machine, which can last for hundreds of steps,
mostly hits both rounds of a pair alike. Each round's CPU time (``time.process_time``: what the
process itself spent) is measured; the headline is the median over the pairs of the
difference (or ratio) within a pair, which the slow phases that hit one round of a pair move
less than any single round's time (the table also shows the fastest round of each). The
Trainer's time includes ``fit``'s set-up, as the loop's includes building its optimizer and
loader. Cases:

* **fixed cost**: a 16 -> 4 linear model on batches of 64, progress off; its steps are so cheap
  that the difference is the Trainer's fixed cost per optimizer step (microseconds; goal
  <= 20 us). Its data are the same samples collated once into an epoch of 64 in-memory
  ``(x, targets, index)`` batches that both loops iterate: a DataLoader's per-sample fetching
  costs both the same (about 300 us per batch here, most of such a step) and would only bury
  the difference in its noise.
* **MLP**: 64 -> 256 -> 10 on batches of 64 with the default progress output (captured here, so
  the plain lines of a non-terminal are written); the ratio of the times (goal <= 1.03).
"""

from __future__ import annotations

import contextlib
import functools
import io
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

N_ITEMS, STEPS, ROUNDS, BATCH, CLASSES = 4096, 400, 80, 64, 10


def _data(dim: int, classes: int):
    from sdk.data import IndexedDataset

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (N_ITEMS,), generator=g)
    x = torch.randn(classes, dim, generator=g)[y] + torch.randn(N_ITEMS, dim, generator=g)
    return IndexedDataset(x, y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, CLASSES))


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(16, 4)


def _loader(data):
    return DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True)


def _in_memory(data):
    return list(_loader(data))  # one shuffled epoch, collated once


def _hand_loop(data, model_fn, progress, batches) -> float:
    start = time.process_time()
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = batches if batches is not None else _loader(data)
    step = 0
    while step < STEPS:
        for x, y, _ in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == STEPS:
                break
    return time.process_time() - start


def _trainer(data, model_fn, progress, batches) -> float:
    import sdk

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        start = time.process_time()
        model = model_fn()
        trainer = sdk.Trainer(model, sdk.create("objective", "cross_entropy"),
                              functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                              max_steps=STEPS, device="cpu", progress=progress)
        trainer.fit(batches if batches is not None else _loader(data))
        elapsed = time.process_time() - start
    return elapsed


CASES = {  # model, input size, classes, progress, data (in-memory batches or a DataLoader)
    "linear 16-4, batch 64, progress off, in-memory batches": (_linear, 16, 4, False, _in_memory),
    "MLP 64-256-10, batch 64, default progress, DataLoader": (_mlp, 64, CLASSES, None, None),
}


def measure(case: str, rounds: int = ROUNDS) -> tuple[list[float], list[float]]:
    """The seconds of each round of the hand loop and of the Trainer for ``case`` (pairs of
    rounds, the order alternating): ``hand[i]`` and ``engine[i]`` ran back to back."""
    model_fn, dim, classes, progress, batches = CASES[case]
    data = _data(dim, classes)
    args = (data, model_fn, progress, batches(data) if batches else None)
    _hand_loop(*args), _trainer(*args)  # warm-up: allocator, plugin discovery
    hand, engine = [], []
    for r in range(rounds):
        pair = (_hand_loop, _trainer) if r % 2 == 0 else (_trainer, _hand_loop)
        for fn in pair:
            (hand if fn is _hand_loop else engine).append(fn(*args))
    return hand, engine


def run(report) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        headline = {}
        for case in CASES:
            hand, engine = measure(case)
            overhead = statistics.median(e - h for h, e in zip(hand, engine)) / STEPS * 1e6
            ratio = statistics.median(e / h for h, e in zip(hand, engine))
            t_hand, t_engine = min(hand), min(engine)
            what = f"{case}, {STEPS} steps, 1 thread"
            fixed = CASES[case][0] is _linear
            headline[fixed] = overhead if fixed else ratio
            report.add("engine", f"hand loop: {what}", steps_per_s=STEPS / statistics.median(hand),
                       goal="")
            report.add("engine", f"sdk.Trainer: {what}",
                       steps_per_s=STEPS / statistics.median(engine),
                       overhead_us_per_step=overhead, ratio=ratio,
                       fastest_overhead_us=(t_engine - t_hand) / STEPS * 1e6,
                       fastest_ratio=t_engine / t_hand,
                       goal="<= 20 us per step" if fixed else "ratio <= 1.03")
        report.note(f"engine: fixed cost {headline[True]:.1f} us per optimizer step (goal <= 20); "
                    f"MLP 64-256-10 with default progress {headline[False]:.3f}x a hand-written "
                    f"loop (goal <= 1.03); medians over {ROUNDS} pairs of rounds")
    finally:
        torch.set_num_threads(threads)
