"""Checkpoints that survive faults, and the random-number-generator state for exact resume.

A run keeps its checkpoints as ``run_dir/checkpoints/step-000123.pt`` (the step in the name;
:func:`prune` keeps the newest few). :func:`save` writes to a temporary file in the same
directory, flushes it to disk and ``os.replace``-s it over the target, so a process killed at
any instant, or a full disk, leaves the previous checkpoints intact and no torn file under a
checkpoint's name. Each file holds ``{"format", "sha256", "state"}``: the SHA-256 of the state's
keys, numbers and tensor bytes, recomputed by :func:`load`.

:func:`load` reads with ``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers,
strings and containers only (:func:`save` refuses anything else), so a file crafted to run code
when unpickled is refused, never executed. :func:`load_newest` walks a directory from the
newest checkpoint to the oldest, warns about each one that is truncated, corrupted or unsafe,
and returns the newest valid one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import re
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdk.errors import CheckpointError, CheckpointWarning

FORMAT = 2
_NAME = re.compile(r"step-(\d+)\.pt")
_PLAIN = (bool, int, float, str, bytes, torch.dtype, torch.device)


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint written at optimizer step ``step``."""
    return f"step-{step:06d}.pt"


def checkpoint_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints of ``directory``, newest (highest step) first; temporary files are not
    checkpoints."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def digest(state: Any) -> str:
    """SHA-256 of ``state``'s structure, keys, numbers, strings and tensor bytes; a
    :class:`CheckpointError` names the first entry that is not a tensor, number, string or
    plain container (what ``weights_only`` loading cannot read back)."""
    h = hashlib.sha256()
    _feed(h, state, "")
    return h.hexdigest()


def _feed(h: Any, value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif type(value) in (dict, OrderedDict):
        h.update(b"D%d" % len(value))
        for key, item in value.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"checkpoint state {where or '(top level)'} has a key of type "
                                      f"{type(key).__name__}; keys must be strings or integers")
            _feed(h, key, where)
            _feed(h, item, f"{where}.{key}" if where else str(key))
    elif type(value) in (list, tuple, torch.Size):
        h.update(b"%s%d" % (type(value).__name__.encode(), len(value)))
        for i, item in enumerate(value):
            _feed(h, item, f"{where}[{i}]")
    elif value is None or type(value) in _PLAIN:
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise CheckpointError(f"checkpoint state {where or '(top level)'} holds a "
                              f"{type(value).__module__}.{type(value).__qualname__}; a checkpoint "
                              f"holds tensors, numbers, strings and lists/tuples/dicts of them only")


def save(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` with its checksum to ``path`` atomically (temp file + fsync +
    ``os.replace``). On any failure the temporary file is removed and what ``path`` held is
    untouched; a full disk raises a :class:`CheckpointError` that says so."""
    path = Path(path)
    record = {"format": FORMAT, "sha256": digest(state), "state": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"cannot write checkpoint {path}: the disk is full "
                                  f"({exc.strerror or exc}); the previous checkpoints are kept "
                                  f"and the partial file was removed") from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return path
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The state in a checkpoint written by :func:`save`, read with ``weights_only=True`` and
    verified against its checksum; a :class:`CheckpointError` names the file and why it is not
    usable (empty, truncated, unsafe, checksum mismatch, not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip() or str(exc).strip()
        detail = detail.splitlines()[0] if detail else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError) and detail.startswith("Unsupported global"):
            raise CheckpointError(f"checkpoint {path} refused: it holds objects other than "
                                  f"tensors, numbers, strings and containers, which could run "
                                  f"code when loaded ({detail})") from None
        if path.stat().st_size == 0:
            reason = "is empty"
        elif not zipfile.is_zipfile(path):
            reason = "is truncated or not a checkpoint (incomplete archive)"
        else:
            reason = f"is unreadable ({detail})"
        raise CheckpointError(f"checkpoint {path} {reason}") from None
    if not (isinstance(record, dict) and record.get("format") == FORMAT
            and isinstance(record.get("sha256"), str) and isinstance(record.get("state"), dict)):
        raise CheckpointError(f"checkpoint {path} is not a paperplug checkpoint of format "
                              f"{FORMAT} (no checksum)")
    try:
        actual = digest(record["state"])
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    if actual != record["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: checksum mismatch (stored "
                              f"{record['sha256'][:12]}..., computed {actual[:12]}...)")
    return record["state"]


def load_newest(directory: str | os.PathLike[str],
                map_location: Any = "cpu") -> tuple[Path, dict[str, Any]]:
    """The newest valid checkpoint of ``directory`` and its state. Each newer file that is not
    valid is reported with a :class:`CheckpointWarning`; when none is valid, a
    :class:`CheckpointError` lists every file and why."""
    files = checkpoint_files(directory)
    if not files:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    problems = []
    for path in files:
        try:
            return path, load(path, map_location)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping {exc}", CheckpointWarning, stacklevel=2)
    raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(problems))


def prune(directory: str | os.PathLike[str], *, keep: int, latest: str | os.PathLike[str]) -> None:
    """After ``latest`` was written: delete the checkpoints of later steps (a run restarted or
    resumed from an earlier point replaced them), all but the ``keep`` newest, and temporary
    files a killed writer left."""
    latest = Path(latest)
    step = int(_NAME.fullmatch(latest.name)[1])
    kept = 0
    for path in checkpoint_files(directory):
        later = int(_NAME.fullmatch(path.name)[1]) > step
        if not later:
            kept += 1
        if later or kept > keep:
            path.unlink(missing_ok=True)
    for path in Path(directory).glob(".step-*.pt.*.tmp"):
        path.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The state of Python's, NumPy's, torch's CPU and every CUDA device's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU, and CUDA or MPS where present) generators.

    The CPU generator is seeded directly: ``torch.manual_seed`` also queues a lazy seeding of
    every accelerator backend, recording a stack trace each time, which costs about 0.25 ms on a
    machine without one."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)


def mismatch(module: torch.nn.Module, saved: Any, *, limit: int = 8) -> str | None:
    """Why the state ``saved`` does not fit ``module`` (keys it lacks, keys it does not have,
    tensors of another shape), or ``None`` when it fits. Lazy parameters and
    :class:`~sdk.state.ResizableBuffers` take their shape from the state and are not compared."""
    if not isinstance(saved, dict):
        return f"the checkpoint holds a {type(saved).__name__}, not a state dict"
    own = module.state_dict()
    shapes = [f"{k} (checkpoint {list(saved[k].shape)}, now {list(v.shape)})"
              for k, v in own.items()
              if isinstance(v, torch.Tensor) and isinstance(saved.get(k), torch.Tensor)
              and saved[k].shape != v.shape and not _takes_shape(module, k, v)]
    found = [("missing from the checkpoint", [k for k in own if k not in saved]),
             ("not in this model", [k for k in saved if k not in own]),
             ("shape mismatch", shapes)]
    parts = [f"{what}: {', '.join(keys[:limit])}"
             + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
             for what, keys in found if keys]
    return "; ".join(parts) or None


def _takes_shape(module: torch.nn.Module, key: str, value: torch.Tensor) -> bool:
    from sdk.state import ResizableBuffers

    if torch.nn.parameter.is_lazy(value):
        return True
    prefix, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(prefix)
    except AttributeError:
        return False
    return isinstance(owner, ResizableBuffers) and name in owner.resizable_buffers
