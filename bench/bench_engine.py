"""Engine overhead: ``sdk.Trainer`` against a hand-written PyTorch loop.

Both train the same MLP on the same data with the same loss (cross-entropy) and optimizer
(SGD with momentum) for the same number of steps, in one process, interleaved over several
rounds (so drifting machine load hits both alike); the medians of the rounds are compared.
The Trainer runs with its defaults (a log point every 50 steps, no run directory); its time
includes ``fit``'s set-up, as the loop's includes building its optimizer. Two models: an MLP
(the goal's case) and a single linear layer on small batches, whose steps are so cheap that
the ratio exposes the Trainer's fixed cost per step (reported in microseconds).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

N_ITEMS, DIM, CLASSES, STEPS, ROUNDS = 4096, 64, 10, 200, 7


def _data():
    from sdk.data import IndexedDataset

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, CLASSES, (N_ITEMS,), generator=g)
    x = torch.randn(CLASSES, DIM, generator=g)[y] + torch.randn(N_ITEMS, DIM, generator=g)
    return IndexedDataset(x, y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, CLASSES))


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM, CLASSES)


CASES = {"MLP 64-256-256-10, batch 128": (_mlp, 128), "linear 64-10, batch 32": (_linear, 32)}


def _hand_loop(data, model_fn, batch) -> float:
    start = time.perf_counter()
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
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
    return time.perf_counter() - start


def _trainer(data, model_fn, batch) -> float:
    import sdk

    start = time.perf_counter()
    model = model_fn()
    trainer = sdk.Trainer(model, sdk.create("objective", "cross_entropy"),
                          functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                          max_steps=STEPS, device="cpu", progress=False)
    trainer.fit(DataLoader(data, batch_size=batch, shuffle=True, drop_last=True))
    return time.perf_counter() - start


def run(report) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = _data()
        for case, (model_fn, batch) in CASES.items():
            args = (data, model_fn, batch)
            _hand_loop(*args), _trainer(*args)  # warm-up: allocator, plugin discovery
            hand, engine = [], []
            for r in range(ROUNDS):
                pair = (_hand_loop, _trainer) if r % 2 == 0 else (_trainer, _hand_loop)
                for fn in pair:
                    (hand if fn is _hand_loop else engine).append(fn(*args))
            t_hand, t_engine = statistics.median(hand), statistics.median(engine)
            what = f"{case}, {STEPS} steps, 1 thread"
            report.add("engine", f"hand-written loop ({what})", steps_per_s=STEPS / t_hand,
                       goal="")
            report.add("engine", f"sdk.Trainer ({what})", steps_per_s=STEPS / t_engine,
                       overhead_us_per_step=(t_engine - t_hand) / STEPS * 1e6,
                       ratio=t_engine / t_hand, goal="<= 1.03" if model_fn is _mlp else "")
    finally:
        torch.set_num_threads(threads)
