"""Contrastive objectives against peer libraries: forward + backward time and peak memory.

Identical inputs (two views ``[B, 128]``, leaves that require grad) go through our objective
and the peers' losses (lightly, pytorch-metric-learning; skipped when not installed). Time:
median over interleaved rounds in one process (the order rotates every round), after a warm-up
step each. ``ratio`` is our median over the fastest peer's (goal <= 1.0).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one step minus the memory
allocated before it. On CPU there is no allocator statistic, so each case runs once more in a
child process with glibc's mmap threshold fixed at 64 KiB (every block of that size or more is
returned to the system when freed) and the peak resident-set growth (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``, minus ``VmRSS`` before the step) is reported: memory the
step really touched, rounded to pages, including small allocator noise (Linux only).

``hard_negative_mixing`` (MoCHi) has no peer implementation: its ratio compares ``nt_xent``
with the sampler (paper defaults) against ``nt_xent`` with the same queue and no synthetic
negatives, i.e. the cost of mixing (the sampler gives its synthetic negatives as similarities
``[2B, 1536]``, never as vectors ``[2B, 1536, D]``). pytorch-metric-learning's NTXentLoss runs
at B = 256 only (see its row).
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.measure import child_peak_memory, peak_bytes, timed

SIZES = (256, 1024, 4096)
DIM = 128
ROUNDS = {256: 9, 1024: 5, 4096: 3}
QUEUE = 4096  # memory negatives for the hard_negative_mixing rows
LIMIT = 3 * 2**30  # cases whose largest tensor would exceed this are skipped (bytes)
SECTION = "contrastive (forward + backward)"

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _peers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import peers

    return peers.lightly_losses(), peers.pml_losses()


def cases(b: int, device: torch.device) -> list[tuple[str, str, Step | str]]:
    """``(group, implementation, loss function of (z1, z2) or the reason it is skipped)``."""
    import sdk

    lightly, pml = _peers()
    views = sdk.Views
    out: list[tuple[str, str, Step | str]] = []

    nt = sdk.create("objective", "nt_xent", temperature=0.5)
    out.append(("nt_xent", "paperplug", lambda z1, z2: nt(views(embeddings=(z1, z2))).value))
    if lightly is not None:
        out.append(("nt_xent", "lightly", lightly.NTXentLoss(temperature=0.5, memory_bank_size=0)))
    if pml is not None:
        pairs = 2 * b * (2 * b) * (2 * b - 2) * 4  # [positive pairs, negative pairs] float mask
        if pairs > LIMIT:
            out.append(("nt_xent", "pytorch-metric-learning",
                        f"skipped: its NTXentLoss builds a [pos pairs x neg pairs] mask, "
                        f"{pairs / 2**30:.0f} GiB"))
        else:
            pml_nt = pml.NTXentLoss(temperature=0.5)
            labels = torch.arange(b, device=device).repeat(2)
            out.append(("nt_xent", "pytorch-metric-learning",
                        lambda z1, z2: pml_nt(torch.cat([z1, z2]), labels)))

    for group, sigma in (("decoupled_contrastive", None), ("decoupled_contrastive sigma=0.5", 0.5)):
        dcl = sdk.create("objective", "decoupled_contrastive", temperature=0.1, sigma=sigma)
        out.append((group, "paperplug",
                    lambda z1, z2, dcl=dcl: dcl(views(embeddings=(z1, z2))).value))
        if lightly is not None:
            peer = (lightly.DCLLoss(temperature=0.1) if sigma is None
                    else lightly.DCLWLoss(temperature=0.1, sigma=sigma))
            out.append((group, "lightly", peer))

    group = f"hard_negative_mixing (queue {QUEUE})"
    g = torch.Generator().manual_seed(1)
    queue = F.normalize(torch.randn(QUEUE, DIM, generator=g), dim=1).to(device)
    mix = sdk.create("objective", "nt_xent", temperature=0.2,
                     sampler=sdk.create("sampler", "hard_negative_mixing", seed=0))
    plain = sdk.create("objective", "nt_xent", temperature=0.2)
    out.append((group, "paperplug", lambda z1, z2: mix(views(embeddings=(z1, z2),
                                                              extras={"negatives": queue})).value))
    out.append((group, "baseline: nt_xent + queue, no mixing",
                lambda z1, z2: plain(views(embeddings=(z1, z2), extras={"negatives": queue})).value))
    return out


def inputs(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return tuple(torch.randn(b, DIM, generator=g).to(device).requires_grad_() for _ in range(2))


def step(fn: Step, z1: torch.Tensor, z2: torch.Tensor) -> None:
    z1.grad = z2.grad = None
    fn(z1, z2).backward()



def time_cases(b: int, device: torch.device) -> dict[tuple[str, str], float | str]:
    """Median seconds per forward + backward (or the reason a case is skipped)."""
    z1, z2 = inputs(b, device)
    listed = cases(b, device)
    runnable = [(grp, name, fn) for grp, name, fn in listed if callable(fn)]
    result: dict[tuple[str, str], float | str] = {
        (grp, name): fn for grp, name, fn in listed if not callable(fn)}
    for _, _, fn in runnable:
        step(fn, z1, z2)  # warm-up
    times: dict[tuple[str, str], list[float]] = {(grp, name): [] for grp, name, _ in runnable}
    for r in range(ROUNDS[b]):
        k = r % len(runnable)
        for grp, name, fn in runnable[k:] + runnable[:k]:
            times[(grp, name)].append(timed(functools.partial(step, fn, z1, z2), device))
    result.update({key: statistics.median(v) for key, v in times.items()})
    return result



def peak_memory(b: int, device: torch.device) -> dict[str, int]:
    """Peak bytes of one step per ``group|implementation`` (see module docstring)."""
    z1, z2 = inputs(b, device)
    peaks = {}
    for grp, name, fn in cases(b, device):
        if not callable(fn):
            continue
        step(fn, z1, z2)  # warm-up: lazily built state is not counted
        z1.grad = z2.grad = None
        gc.collect()
        peaks[f"{grp}|{name}"] = peak_bytes(functools.partial(step, fn, z1, z2), device)
    return peaks



def run(report, sizes: tuple[int, ...] = SIZES) -> None:
    # lightly builds DCLW weights with torch.tensor(tensor), which warns on every call
    warnings.filterwarnings("ignore", message="To copy construct from a tensor")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth"
    for b in sizes:
        times = time_cases(b, device)
        memory = (peak_memory(b, device) if device.type == "cuda"
                  else child_peak_memory("bench.bench_contrastive", b))
        groups = list(dict.fromkeys(grp for grp, _ in times))
        for grp in groups:
            ours = times.get((grp, "paperplug"))
            peers = [t for (g_, name), t in times.items()
                     if g_ == grp and name != "paperplug" and isinstance(t, float)]
            fastest = min(peers) if peers else None
            for (g_, name), t in times.items():
                if g_ != grp:
                    continue
                row: dict[str, object] = {"device": device.type, "B": b, "D": DIM,
                                          "implementation": name}
                if isinstance(t, str):
                    row.update(median_ms="", ratio="", peak_MiB="", note=t)
                else:
                    row.update(median_ms=1000 * t,
                               ratio=(t / fastest if fastest and name == "paperplug"
                                      and isinstance(ours, float) else ""),
                               peak_MiB=memory.get(f"{g_}|{name}", 0) / 2**20,
                               note=where)
                report.add(SECTION, grp, **row)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--memory"]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(peak_memory(int(argv[1]), device)))
        return 0
    from rich.console import Console

    from bench.__main__ import Report

    report = Report()
    run(report, tuple(int(a) for a in argv) or SIZES)
    report.render(Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
