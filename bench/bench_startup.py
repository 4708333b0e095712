"""Start-up cost as plugins grow: ``import sdk``, ``sdk.plugins()`` (every card) and
``sdk.create(kind, name)`` of one built-in plugin, each in a fresh process and the last two
beyond ``import torch``; with the built-in entry points alone and with a synthetic package of
180 more (written to a temporary directory, found through its ``.dist-info`` like any installed
distribution). Byte-code caches and the card index are written by a warm-up run, as an
installation has them after its first use; the rows "no card index" turn the index off (every
module is imported, as on the very first run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SYNTHETIC = 180
REPEATS = 5

CODE_IMPORT = "import time; t = time.perf_counter(); import sdk; print(time.perf_counter() - t)"
CODE_PLUGINS = (
    "import time, torch; t = time.perf_counter(); import sdk; n = len(sdk.plugins()); "
    "print(time.perf_counter() - t, n, len(sdk.broken_plugins()))"
)
CODE_CREATE = (
    "import time, torch; t = time.perf_counter(); import sdk; "
    "sdk.create('objective', 'nt_xent', temperature=0.2); print(time.perf_counter() - t)"
)
CODE_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"

MODULE = '''\
"""Synthetic plugin {i}: a scaled squared distance between two views (benchmark only)."""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def synthetic_{i}_loss(z1: torch.Tensor, z2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * mean ||z1 - z2||^2``."""
    return scale * (z1 - z2).pow(2).sum(dim=1).mean()


class Synthetic{i}(Objective):
    """The squared distance, with four constrained hyperparameters like a real plugin."""

    requires = {{"views": 2}}

    def __init__(self, scale: Annotated[float, Gt(0)] = 1.0, margin: Annotated[float, Ge(0)] = 0.0,
                 share: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 width: Annotated[int, Ge(1)] = 8, gather: bool = False):
        super().__init__()
        self.scale, self.margin, self.share, self.width, self.gather = (
            scale, margin, share, width, gather)

    def forward(self, views: Views, batch: Batch) -> Loss:
        z1, z2 = views.embeddings[:2]
        return Loss(value=synthetic_{i}_loss(z1, z2, self.scale))


CARD = Card(name="synthetic_{i}", kind="objective", title="Synthetic plugin {i}",
            paper="arXiv:0000.{i:05d}", summary="A squared distance, for the start-up benchmark.",
            formula="L = scale * mean_i ||z1_i - z2_i||^2")


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Synthetic{i}, card=CARD)
'''


def write_synthetic(root: Path, n: int = SYNTHETIC) -> Path:
    """A package ``paperplug_synthetic`` of ``n`` plugin modules and its ``.dist-info``."""
    pkg = root / "paperplug_synthetic"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Synthetic plugins for the start-up benchmark."""\n')
    for i in range(n):
        (pkg / f"synthetic_{i}.py").write_text(MODULE.format(i=i))
    info = root / "paperplug_synthetic-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: paperplug-synthetic\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[paperplug]\n" + "".join(f"synthetic_{i} = paperplug_synthetic.synthetic_{i}\n"
                                  for i in range(n)))
    return root


def _env(extra: Path | None, cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PAPERPLUG_CACHE_DIR"] = cache
    if extra is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra), env.get("PYTHONPATH")) if p)
    return env


def _best(code: str, env: dict[str, str]) -> list[str]:
    run = [sys.executable, "-c", code]
    subprocess.run(run, capture_output=True, check=True, env=env)  # warm-up: byte-code caches
    runs = [subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout.split()
            for _ in range(REPEATS)]
    return min(runs, key=lambda r: float(r[0]))


def measure(extra: Path | None, cache: str) -> dict[str, float]:
    """Seconds of each figure (plugins and create beyond import torch) and the plugin count;
    ``cache`` is the card index's directory, "" for none."""
    env = _env(extra, cache)
    (t_torch,) = _best(CODE_TORCH, env)
    (t_import,) = _best(CODE_IMPORT, env)
    t_plugins, n, broken = _best(CODE_PLUGINS, env)
    (t_create,) = _best(CODE_CREATE, env)
    if int(broken):
        raise RuntimeError(f"{broken} plugin module(s) failed to load")
    return {"import": float(t_import), "plugins": float(t_plugins), "create": float(t_create),
            "torch": float(t_torch), "cards": int(n)}


def run(report) -> None:
    builtin = len(metadata.entry_points(group="paperplug"))
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {builtin: None, builtin + SYNTHETIC: write_synthetic(Path(tmp) / "site")}
        for eps, extra in sizes.items():
            m = measure(extra, str(Path(tmp) / "cache"))
            cold = measure(extra, "")
            label = f"{eps} entry points ({m['cards']} plugins)"
            report.add("startup", f"import sdk, {label}", seconds=m["import"], goal="< 0.3 s")
            report.add("startup", f"sdk.plugins() beyond import torch, {label}",
                       seconds=m["plugins"], no_card_index=cold["plugins"], goal="< 0.5 s")
            report.add("startup", f"sdk.create('objective', 'nt_xent') beyond import torch, {label}",
                       seconds=m["create"], no_card_index=cold["create"], goal="< 0.1 s")
            report.add("startup", f"import torch (reference), {label}", seconds=m["torch"], goal="")

