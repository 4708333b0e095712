"""Reweighter overhead: a training step with a reweighter against the same step without one.

One step is the forward of an MLP (64 -> 256 -> 10 on a batch of 256, and 64 -> 1024 -> 10 on
a batch of 1024) on a fixed batch, the per-sample
cross-entropy, its reduction (the mean, or ``reweighter.reduce``: weights and
``sum(w l) / sum(w)``), backward and an SGD step with momentum; one process, one thread. The
unweighted and each weighted loop run interleaved over several rounds (so drifting machine load
hits all alike) and the medians of the rounds' CPU times (``time.process_time``) are compared;
the issue's goal is a ratio <= 1.05.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

STEPS, ROUNDS, CLASSES = 100, 5, 10
SIZES = ((256, 256), (1024, 1024))  # (hidden width, batch)


def _reweighters(batch: int):
    import sdk
    from sdk import keys

    g = torch.Generator().manual_seed(1)
    times = torch.rand(batch, generator=g) + 0.1
    events = (torch.rand(batch, generator=g) < 0.7).long()
    ipcw = sdk.create("reweighter", "ipcw_erm").fit(times, events)
    return {
        "group_dro": (sdk.create("reweighter", "group_dro", num_groups=2), {}),
        "kl_dro_instance_weights": (sdk.create("reweighter", "kl_dro_instance_weights"), {}),
        "loss_based_sample_reweighting": (sdk.create("reweighter", "loss_based_sample_reweighting",
                                                     burnin=0), {}),
        "ipcw_erm": (ipcw, {"extras": {keys.TIME: times, keys.EVENT: events}}),
    }


def _loop(x, y, batch, reweighter, width) -> float:
    from sdk.types import Loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = time.process_time()
    for _ in range(STEPS):
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        if reweighter is None:
            loss = per_sample.mean()
        else:
            loss = reweighter.reduce(Loss(value=per_sample.mean(), per_sample=per_sample), batch).value
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.process_time() - start


def run(report) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for width, size in SIZES:
            _case(report, width, size)
    finally:
        torch.set_num_threads(threads)


def _case(report, width: int, size: int) -> None:
    from sdk.types import Batch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, 64, generator=g)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    cases = _reweighters(size)
    batches = {name: Batch(targets=y, index=torch.arange(size), domain=torch.arange(size) % 2, **kw)
               for name, (_, kw) in cases.items()}
    times = {name: [] for name in ["none", *cases]}
    for _ in range(ROUNDS):
        times["none"].append(_loop(x, y, None, None, width))
        for name, (rw, _) in cases.items():
            times[name].append(_loop(x, y, batches[name], rw, width))
    base = statistics.median(times["none"])
    what = f"MLP 64-{width}-10, batch {size}"
    report.add("reweighting", f"unweighted step, {what}", ms_per_step=1e3 * base / STEPS, ratio=1.0,
               goal="")
    worst = 0.0
    for name in cases:
        t = statistics.median(times[name])
        worst = max(worst, t / base)
        report.add("reweighting", f"{name}, {what}", ms_per_step=1e3 * t / STEPS, ratio=t / base,
                   goal="ratio <= 1.05")
    report.note(f"reweighting: the slowest reweighter's step is {worst:.3f}x an unweighted step "
                f"({what}, 1 thread; goal <= 1.05)")
