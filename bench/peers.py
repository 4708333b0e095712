"""Peer libraries used as oracles and benchmark baselines: lightly and pytorch-metric-learning.

Both are optional (``nox -s bench`` installs them with ``pip install --no-deps lightly
pytorch-metric-learning tqdm``, which leaves the installed torch alone). lightly's
``lightly.loss`` package imports ``torchvision.ops`` for its detection losses; PyPI's
torchvision wheels are CUDA builds that cannot load next to a CPU torch, so when torchvision is
missing or broken the two names lightly binds at import time are provided by a placeholder
module for the duration of the import (the contrastive losses compared here use torch alone).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def _import_lightly_loss() -> Any:
    try:
        return importlib.import_module("lightly.loss")
    except ModuleNotFoundError as exc:
        if exc.name == "lightly":
            raise
    except Exception:  # noqa: BLE001 - a torchvision build that does not match torch
        pass
    for name in [m for m in sys.modules if m == "lightly" or m.startswith(("lightly.", "torchvision"))]:
        del sys.modules[name]
    ops = types.ModuleType("torchvision.ops")

    def _unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError("torchvision is not available")

    ops.roi_align = _unavailable
    ops.StochasticDepth = type("StochasticDepth", (), {"__init__": _unavailable})
    placeholder = types.ModuleType("torchvision")
    placeholder.ops = ops
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    sys.modules.update({"torchvision": placeholder, "torchvision.ops": ops})
    try:
        return importlib.import_module("lightly.loss")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def lightly_losses() -> Any | None:
    """``lightly.loss`` (NTXentLoss, DCLLoss, DCLWLoss, ...) or None when lightly is absent."""
    try:
        return _import_lightly_loss()
    except ImportError:
        return None


def pml_losses() -> Any | None:
    """``pytorch_metric_learning.losses`` or None when it is absent."""
    try:
        return importlib.import_module("pytorch_metric_learning.losses")
    except ImportError:
        return None
