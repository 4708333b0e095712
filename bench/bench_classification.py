"""Classification losses against ``torch.nn.functional.cross_entropy``: forward + backward time
and peak memory on identical logits ``[B, C]`` (B = 4096, C in 10, 1000, 32768, float32 leaves
that require grad) and class-id targets.

Time: median over interleaved rounds in one process (the order rotates every round), after a
warm-up step each; ``ratio`` is a loss's median over ``F.cross_entropy``'s (goal <= 2.0 for the
one-pass losses: every loss here but ``knowledge_distillation``, which also normalises the
teacher's logits). Peak memory as in ``bench_contrastive``: ``torch.cuda.max_memory_allocated``
growth during one step on CUDA; on CPU the peak resident-set growth of the step in a child
process with glibc's mmap threshold at 64 KiB. ``peak_x_BC`` is that peak in units of one
``[B, C]`` float32 tensor: the logits' gradient alone is 1.
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.measure import child_peak_memory, peak_bytes, timed

B = 4096
CLASSES = (10, 1000, 32768)
ROUNDS = {10: 15, 1000: 7, 32768: 3}
SECTION = "classification losses (forward + backward)"
REFERENCE = "F.cross_entropy"

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cases(c: int, device: torch.device) -> list[tuple[str, Step]]:
    """``(name, loss of (logits, targets))``; the first is the reference."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sdk
    from sdk import keys

    out: list[tuple[str, Step]] = [(REFERENCE, lambda z, y: F.cross_entropy(z, y))]
    teacher = torch.randn(B, c, generator=torch.Generator().manual_seed(1)).to(device)
    for name in ("cross_entropy", "focal_loss", "poly_loss", "z_loss", "ldr_kl_loss", "anyloss",
                 "comp_sum_losses", "stablemax_perpgrad", "decoupled_softmax_xmc", "decoupled_mixup",
                 "knowledge_distillation"):
        try:
            obj = sdk.create("objective", name).to(device)
        except sdk.PluginNotFoundError:  # not registered in this checkout
            continue
        extras = {keys.TEACHER: (teacher,)} if name == "knowledge_distillation" else {}
        out.append((name, lambda z, y, obj=obj, extras=extras:
                    obj(sdk.Views(logits=z, extras=extras), sdk.Batch(targets=y)).value))
    return out


def inputs(c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(c)
    z = (2 * torch.randn(B, c, generator=g)).to(device).requires_grad_()
    return z, torch.randint(0, c, (B,), generator=g).to(device)


def step(fn: Step, z: torch.Tensor, y: torch.Tensor) -> None:
    z.grad = None
    fn(z, y).backward()



def time_cases(c: int, device: torch.device) -> dict[str, float]:
    z, y = inputs(c, device)
    listed = cases(c, device)
    for _, fn in listed:
        step(fn, z, y)  # warm-up
    times: dict[str, list[float]] = {name: [] for name, _ in listed}
    for r in range(ROUNDS[c]):
        k = r % len(listed)
        for name, fn in listed[k:] + listed[:k]:
            times[name].append(timed(functools.partial(step, fn, z, y), device))
    return {name: statistics.median(v) for name, v in times.items()}



def peak_memory(c: int, device: torch.device) -> dict[str, int]:
    z, y = inputs(c, device)
    peaks = {}
    for name, fn in cases(c, device):
        step(fn, z, y)
        z.grad = None
        gc.collect()
        peaks[name] = peak_bytes(functools.partial(step, fn, z, y), device)
    return peaks



def run(report, classes: tuple[int, ...] = CLASSES) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth"
    for c in classes:
        times = time_cases(c, device)
        memory = (peak_memory(c, device) if device.type == "cuda"
                  else child_peak_memory("bench.bench_classification", c))
        reference, bc = times[REFERENCE], B * c * 4
        for name, t in times.items():
            report.add(SECTION, name, device=device.type, B=B, C=c, median_ms=1000 * t,
                       ratio=t / reference, peak_MiB=memory.get(name, 0) / 2**20,
                       peak_x_BC=memory.get(name, 0) / bc, note=where)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--memory"]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(peak_memory(int(argv[1]), device)))
        return 0
    from rich.console import Console

    from bench.__main__ import Report

    report = Report()
    run(report, tuple(int(a) for a in argv) or CLASSES)
    report.render(Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
