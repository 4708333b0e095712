"""A user's own data as ``(x, y)`` tensors: an image folder, a CSV/Parquet table, NumPy arrays.

:func:`sdk.data.load` cuts what these readers return into the stratified splits every recipe
trains on (``[data] name = "image_folder" | "table" | "arrays"``). Each reader returns a
:class:`Source`: features ``x`` (float32, one row per sample, flattened for images), class ids
``y`` (0..K-1, in the sorted order of the class names), the class names, and the image layout
when the rows are images. Nothing a reader opens can run code: images are decoded by Pillow,
tables by pandas (pyarrow for Parquet), arrays by ``numpy.load(allow_pickle=False)``, and the
decoded-image cache is read back with ``torch.load(weights_only=True)``.

- :func:`image_folder`: ``root/<class>/<image>`` (one sub-folder per class, any format Pillow
  reads), each image converted to grayscale or RGB and resized to ``size``; values in ``[0, 1]``.
  The decoded tensors are cached (``$PAPERPLUG_CACHE``, else ``$XDG_CACHE_HOME/paperplug``, else
  ``~/.cache/paperplug``) under a key made of every file's path, size and modification time and
  the decoding settings, so a second run decodes nothing and an edited folder is decoded anew.
- :func:`table`: the ``target`` column gives the classes; ``features`` (default: every other
  column) are the inputs; columns that are not numeric, and those listed in ``categorical``,
  are one-hot encoded (one column per value, sorted).
- :func:`arrays`: an ``.npz`` with arrays ``x`` and ``y`` (other names by ``features=[key]`` and
  ``target=key``), or an ``.npy`` of features with the ``.npy`` of targets named by ``target``.
  ``x`` of shape ``[N, H, W]`` or ``[N, C, H, W]`` is taken as images (uint8 scaled to [0, 1]).

Every error is a :class:`~sdk.ConfigError` naming the recipe field at fault (``data.path``,
``data.target``, ...) and the file, column or shape.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from sdk.errors import ConfigError

SOURCES = ("image_folder", "table", "arrays")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
COLORS = ("grayscale", "rgb")
_CACHE_VERSION = 1


@attrs.frozen(kw_only=True)
class Source:
    """What a reader found: ``x [N, D]`` float32, ``y [N]`` class ids, the class names and, for
    images, ``image_shape`` (H, W) and ``channels`` (rows are ``[C, H, W]`` flattened)."""

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]
    image_shape: tuple[int, int] | None = None
    channels: int = 1


def _error(field: str, message: str) -> ConfigError:
    return ConfigError(f"data.{field}: {message}", param=field, path=f"data.{field}")


def _existing(path: str | os.PathLike[str] | None, what: str) -> Path:
    if path is None:
        raise _error("path", f"the {what} source needs a path")
    p = Path(path).expanduser()
    if not p.exists():
        raise _error("path", f"{str(p)!r} does not exist (relative paths are taken from the "
                     f"working directory {os.getcwd()!r})")
    return p


def _class_ids(values: Sequence[Any], field: str) -> tuple[Tensor, tuple[str, ...]]:
    """Class ids in the sorted order of the distinct values, and the values as names."""
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise _error(field, f"needs at least two classes, found {len(distinct)}: {distinct}")
    ids = {v: i for i, v in enumerate(distinct)}
    return torch.tensor([ids[v] for v in values], dtype=torch.long), tuple(map(str, distinct))


# image folders ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where decoded image folders are cached."""
    if os.environ.get("PAPERPLUG_CACHE"):
        return Path(os.environ["PAPERPLUG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paperplug"


def _listing(root: Path) -> list[tuple[str, Path]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise _error("path", f"image folder {str(root)!r} has no class sub-folders (expected "
                     "root/<class>/<image>)")
    files = []
    for d in classes:
        found = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            raise _error("path", f"class folder {str(d)!r} holds no images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
        files += [(d.name, f) for f in found]
    return files


def _cache_key(root: Path, files: list[tuple[str, Path]], size: tuple[int, int], color: str) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}|{root.resolve()}|{size}|{color}".encode())
    for name, f in files:
        st = f.stat()
        h.update(f"|{name}|{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _decode(files: list[tuple[str, Path]], size: tuple[int, int], color: str) -> Tensor:
    try:
        import numpy as np
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError("the image_folder source needs Pillow: pip install pillow") from exc
    mode = "L" if color == "grayscale" else "RGB"
    out = torch.empty(len(files), 1 if mode == "L" else 3, *size, dtype=torch.uint8)
    for i, (_, f) in enumerate(files):
        try:
            with Image.open(f) as img:
                img = img.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise _error("path", f"cannot read image {str(f)!r}: {exc}") from None
        out[i] = torch.from_numpy(pixels.reshape(size[0], size[1], -1).copy()).permute(2, 0, 1)
    return out


def image_folder(path: str | os.PathLike[str] | None, *, size: Sequence[int] = (32, 32),
                 color: str = "grayscale", cache: bool = True) -> Source:
    """Read ``path/<class>/<image>`` into ``[N, C*H*W]`` values in [0, 1] (see the module)."""
    root = _existing(path, "image_folder")
    if not root.is_dir():
        raise _error("path", f"{str(root)!r} is not a folder")
    if len(size) != 2 or min(size) < 1:
        raise _error("image_size", f"expected [height, width] of positive integers, got {list(size)}")
    if color not in COLORS:
        raise _error("color", f"expected one of {', '.join(COLORS)}, got {color!r}")
    hw = (int(size[0]), int(size[1]))
    files = _listing(root)
    pixels = None
    if cache:
        target = cache_dir() / "image_folder" / f"{_cache_key(root, files, hw, color)}.pt"
        if target.exists():
            try:
                pixels = torch.load(target, weights_only=True)
            except Exception:  # a damaged cache file is decoded again and replaced
                pixels = None
            if not (isinstance(pixels, Tensor) and pixels.shape[0] == len(files)
                    and pixels.dtype == torch.uint8):
                pixels = None
    if pixels is None:
        pixels = _decode(files, hw, color)
        if cache:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            torch.save(pixels, tmp)
            os.replace(tmp, target)
    y, classes = _class_ids([name for name, _ in files], "path")
    return Source(x=pixels.flatten(1).float() / 255.0, y=y, classes=classes, image_shape=hw,
                  channels=pixels.shape[1])


# tables ----------------------------------------------------------------------------------------


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError("the table source needs pandas (and pyarrow for Parquet): "
                          "pip install 'paperplug[tables]'") from exc
    return pandas


def _read_table(p: Path) -> Any:
    pd = _pandas()
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise _error("path", f"{str(p)!r}: expected a table ({', '.join(TABLE_SUFFIXES)})")
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",")
    except ImportError as exc:
        raise ImportError(f"reading {p.name} needs pyarrow: pip install 'paperplug[tables]'") from exc
    except (ValueError, OSError) as exc:  # pandas' parser errors are ValueErrors
        raise _error("path", f"cannot read table {str(p)!r}: {exc}") from None


def table(path: str | os.PathLike[str] | None, *, target: str | None,
          features: Sequence[str] | None = None, categorical: Sequence[str] = ()) -> Source:
    """Read a CSV/TSV/Parquet table: ``target`` gives the classes, the rest the inputs."""
    frame = _read_table(_existing(path, "table"))
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if target is None:
        raise _error("target", f"the table source needs the target column; columns: {columns}")
    if target not in columns:
        raise _error("target", f"no column {target!r}; columns: {columns}")
    chosen = [c for c in columns if c != target] if features is None else list(features)
    for field, names in (("features", chosen), ("categorical", list(categorical))):
        missing = [c for c in names if c not in columns]
        if missing:
            raise _error(field, f"no column {missing[0]!r}; columns: {columns}")
    if target in chosen:
        raise _error("features", f"the target column {target!r} cannot also be a feature")
    if not chosen:
        raise _error("features", "no feature columns")
    if len(frame) == 0:
        raise _error("path", f"{str(path)!r} has no rows")
    for c in [target, *chosen]:
        n = int(frame[c].isna().sum())
        if n:
            raise _error("features" if c != target else "target",
                         f"column {c!r} has {n} missing value(s); fill or drop them first")
    pd = _pandas()
    encode = [c for c in chosen if c in categorical or not pd.api.types.is_numeric_dtype(frame[c])]
    parts = []
    for c in chosen:
        if c in encode:
            values = frame[c].astype(str)
            for v in sorted(values.unique()):
                parts.append(torch.tensor((values == v).to_numpy(), dtype=torch.float32))
        else:
            parts.append(torch.tensor(frame[c].to_numpy(dtype="float64"), dtype=torch.float32))
    labels = frame[target]
    if pd.api.types.is_float_dtype(labels) and not (labels == labels.round()).all():
        raise _error("target", f"column {target!r} holds non-integer numbers; the table source "
                     "reads classification targets (class names or integer ids)")
    values = labels.tolist() if pd.api.types.is_numeric_dtype(labels) else labels.astype(str).tolist()
    y, classes = _class_ids(values, "target")
    return Source(x=torch.stack(parts, 1), y=y, classes=classes)


# arrays ----------------------------------------------------------------------------------------


def _load_array(p: Path, field: str) -> Any:
    import numpy as np

    try:
        return np.load(p, allow_pickle=False)
    except ValueError as exc:  # object arrays would need pickle: refused
        raise _error(field, f"cannot read {str(p)!r} without pickle: {exc}") from None
    except OSError as exc:
        raise _error(field, f"cannot read {str(p)!r}: {exc}") from None


def arrays(path: str | os.PathLike[str] | None, *, target: str | None = None,
           features: Sequence[str] | None = None) -> Source:
    """Read ``.npz`` arrays (``x``/``y``, or ``features=[key]``/``target=key``) or an ``.npy``
    of features beside the ``.npy`` of targets named by ``target``."""
    import numpy as np

    p = _existing(path, "arrays")
    if p.suffix == ".npz":
        with _load_array(p, "path") as archive:
            x_key = "x" if features is None else (list(features) or [""])[0]
            y_key = "y" if target is None else target
            if features is not None and len(features) != 1:
                raise _error("features", f"an .npz source takes one features key, got {list(features)}")
            for field, key in (("features", x_key), ("target", y_key)):
                if key not in archive.files:
                    raise _error(field, f"{str(p)!r} has no array {key!r}; arrays: {archive.files}")
            x, y = archive[x_key], archive[y_key]
    elif p.suffix == ".npy":
        if target is None:
            raise _error("target", "an .npy source needs target = the .npy file of the targets")
        if features is not None:
            raise _error("features", "an .npy source takes its features from path")
        x = _load_array(p, "path")
        y = _load_array(_existing(target, "arrays target"), "target")
    else:
        raise _error("path", f"{str(p)!r}: expected an .npz or .npy file")
    if x.ndim not in (2, 3, 4) or y.ndim != 1:
        raise _error("path", f"expected x of shape [N, D], [N, H, W] or [N, C, H, W] and y of "
                     f"shape [N], got {list(x.shape)} and {list(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise _error("target", f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise _error("path", f"features must be numeric, got {x.dtype}")
    features_t = torch.as_tensor(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0))
    if not torch.isfinite(features_t).all():
        raise _error("path", f"{str(p)!r}: features hold NaN or inf")
    if np.issubdtype(y.dtype, np.floating) and not np.all(y == np.round(y)):
        raise _error("target", "targets hold non-integer numbers; expected class ids or names")
    labels, classes = _class_ids(y.tolist(), "target")
    image_shape = tuple(int(s) for s in x.shape[-2:]) if x.ndim > 2 else None
    return Source(x=features_t.flatten(1), y=labels, classes=classes, image_shape=image_shape,
                  channels=int(x.shape[1]) if x.ndim == 4 else 1)


def read(name: str, **options: Any) -> Source:
    """The reader named ``name`` (one of :data:`SOURCES`) with the options it takes."""
    readers = {"image_folder": image_folder, "table": table, "arrays": arrays}
    return readers[name](**options)
