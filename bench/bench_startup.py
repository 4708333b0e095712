"""Start-up cost: ``import sdk`` (without torch) and discovery of every plugin."""

from __future__ import annotations

import subprocess
import sys

CODE_IMPORT = "import time; t = time.perf_counter(); import sdk; print(time.perf_counter() - t)"
CODE_DISCOVER = (
    "import time, torch; t = time.perf_counter(); import sdk; n = len(sdk.plugins()); "
    "print(time.perf_counter() - t, n, len(sdk.broken_plugins()))"
)
CODE_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"


def _best(code: str, repeats: int = 5) -> list[float]:
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(repeats)]
    return min(runs, key=lambda r: float(r[0]))


def run(report) -> None:
    (t_import,) = _best(CODE_IMPORT)
    (t_torch,) = _best(CODE_TORCH)
    t_disc, n, broken = _best(CODE_DISCOVER)
    report.add("startup", "import sdk (imports no torch, no plugin)", seconds=float(t_import),
               goal="< 0.3 s")
    report.add("startup", f"discover all {n} plugins ({broken} broken), torch already imported",
               seconds=float(t_disc), goal="< 0.5 s")
    report.add("startup", "import torch (for reference)", seconds=float(t_torch), goal="")
