"""Out-of-distribution detectors: the streaming ``mahalanobis`` fit at N = 100 000 features of
width D = 1024 in C = 1000 classes (fed in batches of 4096 drawn on the fly, so the features
never exist at once), its time and peak memory; and the scoring throughput of every detector
on 4096 rows (features ``[4096, 1024]``, logits ``[4096, 1000]``; ``knn_ood`` and ``vim`` fitted
on 20 000 rows, ``odin`` through a linear model 1024 -> 1000).

Peak memory as in the loss benchmarks: CUDA's allocator growth on a GPU, the resident-set
growth on the CPU. pytorch-ood, the peer, is compared only when it is installed (it is not in
the project's environment); its Mahalanobis keeps every feature in memory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.measure import peak_bytes, sync

N, D, C, BATCH = 100_000, 1024, 1000, 4096
SCORE_ROWS, BANK_ROWS = 4096, 20_000
SECTION_FIT = "mahalanobis streaming fit"
SECTION_SCORE = "detector scoring throughput"


def _batches(n: int, d: int, c: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    means = 3 * torch.randn(c, d, generator=g, device=device)
    for lo in range(0, n, BATCH):
        rows = min(BATCH, n - lo)
        y = torch.randint(0, c, (rows,), generator=g, device=device)
        yield means[y] + torch.randn(rows, d, generator=g, device=device), y


def fit_mahalanobis(n: int, d: int, c: int, device: torch.device):
    import sdk

    det = sdk.create("detector", "mahalanobis").to(device)
    for x, y in _batches(n, d, c, device):
        det.update(x, y)
    det.finalize()
    sync(device)
    return det


def time_scoring(device: torch.device) -> dict[str, float]:
    import sdk

    g = torch.Generator(device=device).manual_seed(1)
    feats = torch.randn(SCORE_ROWS, D, generator=g, device=device)
    logits = torch.randn(SCORE_ROWS, C, generator=g, device=device)
    bank = torch.randn(BANK_ROWS, D, generator=g, device=device)
    labels = torch.randint(0, C, (BANK_ROWS,), generator=g, device=device)
    model = torch.nn.Linear(D, C).to(device)
    built = {
        "msp": (sdk.create("detector", "msp"), logits),
        "max_logit": (sdk.create("detector", "max_logit"), logits),
        "energy": (sdk.create("detector", "energy"), logits),
        "odin": (sdk.create("detector", "odin", model=model), feats),
        "mahalanobis": (sdk.create("detector", "mahalanobis").to(device).fit(bank, labels), feats),
        "knn_ood": (sdk.create("detector", "knn_ood").to(device).fit(bank), feats),
        "vim": (sdk.create("detector", "vim", head=model).to(device).fit(bank), feats),
    }
    out = {}
    for name, (det, x) in built.items():
        det.score(x)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            det.score(x)
        sync(device)
        out[name] = 3 * SCORE_ROWS / (time.perf_counter() - start)
    return out


def run(report) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    peak = peak_bytes(lambda: fit_mahalanobis(N, D, C, device), device)
    seconds = time.perf_counter() - start
    state = (C * D + D * D + D * D + C) * 8  # means, scatter, precision, counts (float64)
    report.add(SECTION_FIT, f"paperplug N={N} D={D} C={C}", device=device.type, seconds=seconds,
               peak_MiB=peak / 2**20, state_MiB=state / 2**20,
               all_features_MiB=N * D * 4 / 2**20)
    try:
        import pytorch_ood  # noqa: F401
    except ImportError:
        report.note("mahalanobis: pytorch-ood is not installed, so no peer figure (its fit keeps all "
                    f"{N} x {D} features: {N * D * 4 / 2**20:.0f} MiB in float32 before any statistics)")
    for name, rate in time_scoring(device).items():
        report.add(SECTION_SCORE, name, device=device.type, rows_per_s=rate)
