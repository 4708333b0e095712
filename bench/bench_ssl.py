"""Non-contrastive self-supervised losses against lightly's: forward + backward time on identical
embeddings of two views ``[B, D]`` (float32 leaves that require grad; the teacher's side
detached where the method detaches it), B in 256, 1024 and D in 128, 2048 (SwAV's scores and
DINO's outputs have their own widths, 3000 prototypes and 4096: timed once per B), and the peak
memory of one step (as ``bench_classification`` measures it: CUDA's allocator, or on the CPU
the resident-set growth in a fresh process).

Pairs: ``barlow_twins`` / ``BarlowTwinsLoss``, ``vicreg`` / ``VICRegLoss``, ``byol`` and
``simsiam`` (their symmetric negative cosine) / ``NegativeCosineSimilarity`` called per direction,
``swav`` (3 Sinkhorn iterations, 3000 prototypes' scores) / ``SwaVLoss``, ``dino`` (output 4096, two
global views) / ``DINOLoss``. Median over interleaved rounds in one process (the order alternates),
one CPU thread, after a warm-up step each; ``ratio`` is ours over lightly's (goal <= 1.0) in time,
``memory_ratio`` in peak memory. Without lightly there are no rows.
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

from bench import peers
from bench.measure import child_peak_memory, peak_bytes, timed

BATCHES, DIMS = (256, 1024), (128, 2048)
ROUNDS = 7
SECTION = "SSL losses (forward + backward), against lightly"
PROTOTYPES, DINO_OUT = 3000, 4096

Step = Callable[[list[torch.Tensor]], torch.Tensor]


def _views(b: int, d: int, device: torch.device, n: int = 4, seed: int = 0,
           cosines: bool = False) -> list[torch.Tensor]:
    """``n`` leaves ``[b, d]``; ``cosines``: in [-1, 1], as SwAV's prototype scores are."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, d, generator=g) for _ in range(n)]
    return [(torch.tanh(z) if cosines else z).to(device).requires_grad_() for z in out]


def pairs(device: torch.device) -> list[tuple[str, Step, Step, int | None]]:
    """``(name, ours, lightly's, output width or None for D)``: each takes the view tensors
    (online z1, z2 and targets t1, t2, or prototype/DINO scores) and returns a scalar."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sdk
    from plugins.ssl.barlow_twins import barlow_twins_loss
    from plugins.ssl.byol import byol_loss
    from plugins.ssl.simsiam import simsiam_loss
    from plugins.ssl.swav import swav_loss
    from plugins.ssl.vicreg import vicreg_loss
    from sdk import keys
    from sdk.ssl import sinkhorn

    lightly = peers.lightly_losses()
    if lightly is None:
        return []
    cos = lightly.NegativeCosineSimilarity()
    bt, vic = lightly.BarlowTwinsLoss(lambda_param=5e-3), lightly.VICRegLoss()
    sw = lightly.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    dino_ours = sdk.create("objective", "dino").to(device)
    dino_theirs = lightly.DINOLoss(output_dim=DINO_OUT, warmup_teacher_temp=0.04,
                                   teacher_temp=0.04, student_temp=0.1).to(device)

    def ours_dino(v):
        teacher = (v[2].detach(), v[3].detach())
        views = sdk.Views(embeddings=(v[0], v[1]), extras={keys.TEACHER: teacher})
        return dino_ours(views).value

    def ours_swav(v):
        codes = [sinkhorn(s.detach(), bound=1.0) for s in v[:2]]  # cosine scores, as swav has
        return swav_loss(v[:2], codes, temperature=0.1)

    return [
        ("barlow_twins", lambda v: barlow_twins_loss(v[0], v[1], 5e-3),
         lambda v: bt(v[0], v[1]), None),
        ("vicreg", lambda v: vicreg_loss(v[0], v[1]), lambda v: vic(v[0], v[1]), None),
        ("byol", lambda v: byol_loss([v[0], v[1]], [v[2].detach(), v[3].detach()]).mean(),
         lambda v: 4 + 2 * (cos(v[0], v[3].detach()) + cos(v[1], v[2].detach())), None),
        ("simsiam", lambda v: simsiam_loss([v[0], v[1]], [v[2].detach(), v[3].detach()]).mean(),
         lambda v: (cos(v[0], v[3].detach()) + cos(v[1], v[2].detach())) / 2, None),
        ("swav", ours_swav, lambda v: sw(v[:2], []), PROTOTYPES),
        ("dino", ours_dino, lambda v: dino_theirs(teacher_out=[v[2].detach(), v[3].detach()],
                                                  student_out=[v[0], v[1]]), DINO_OUT),
    ]


def _step(fn: Step, views: list[torch.Tensor]) -> None:
    for v in views:
        v.grad = None
    fn(views).backward()


def _cases(device: torch.device, b: int, d: int):
    """The pairs timed at ``[b, d]``: the fixed-width ones only at the first D."""
    return [(name, ours, theirs, width) for name, ours, theirs, width in pairs(device)
            if width is None or d == DIMS[0]]


def peak_memory(b: int, d: int, device: torch.device) -> dict[str, int]:
    """``{"name": bytes, "name/lightly": bytes}``: the peak of one step of each."""
    peaks = {}
    for name, ours, theirs, width in _cases(device, b, d):
        views = _views(b, width or d, device, cosines=name == "swav")
        for key, fn in ((name, ours), (f"{name}/lightly", theirs)):
            _step(fn, views)
            gc.collect()
            peaks[key] = peak_bytes(functools.partial(_step, fn, views), device)
    return peaks


def run(report, batches: tuple[int, ...] = BATCHES, dims: tuple[int, ...] = DIMS) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not pairs(device):
        report.note("ssl: lightly is not installed, no rows (pip install --no-deps lightly tqdm)")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, several threads time the machine's load instead
    try:
        _run(report, device, batches, dims)
    finally:
        torch.set_num_threads(threads)


def _run(report, device: torch.device, batches: tuple[int, ...], dims: tuple[int, ...]) -> None:
    for b, d in ((b, d) for b in batches for d in dims):
        memory = (peak_memory(b, d, device) if device.type == "cuda"
                  else child_peak_memory("bench.bench_ssl", f"{b}x{d}"))
        for name, ours, theirs, width in _cases(device, b, d):
            views = _views(b, width or d, device, cosines=name == "swav")
            _step(ours, views), _step(theirs, views)  # warm-up
            mine, peer = [], []
            for r in range(ROUNDS):
                order = ((ours, mine), (theirs, peer)) if r % 2 == 0 else ((theirs, peer), (ours, mine))
                for fn, into in order:
                    into.append(timed(functools.partial(_step, fn, views), device))
            t_ours, t_peer = statistics.median(mine), statistics.median(peer)
            m_ours, m_peer = memory[name], memory[f"{name}/lightly"]
            report.add(SECTION, name, device=device.type, B=b, D=width or d,
                       median_ms=1000 * t_ours, lightly_ms=1000 * t_peer, ratio=t_ours / t_peer,
                       peak_MiB=m_ours / 2**20, lightly_peak_MiB=m_peer / 2**20,
                       memory_ratio=m_ours / m_peer if min(m_ours, m_peer) >= 2**20 else "",
                       goal="<= 1.0")  # below 1 MiB the resident-set growth is page noise


def main(argv: list[str]) -> int:
    if argv[:1] == ["--memory"]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        b, d = (int(v) for v in argv[1].split("x"))
        print(json.dumps(peak_memory(b, d, device)))
        return 0
    from rich.console import Console

    from bench.__main__ import Report

    report = Report()
    run(report)
    report.render(Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

