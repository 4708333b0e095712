"""The recipes' datasets (scikit-learn's digits, wine, breast_cancer, or a user's own image
folder, table or arrays through :mod:`sdk.datasources`) and tensor-level views.

Every dataset yields ``(x, y, index)`` so the engine can fill ``Batch.targets`` and
``Batch.index`` (per-sample state is keyed by dataset index). :func:`load` returns stratified
``train`` / ``calibration`` / ``test`` splits; the held-out ``calibration`` split is where
post-hoc calibrators are fitted, ``test`` is where everything is measured.

The augmentations are plain tensor transforms (they act on a whole batch, on its device, and
draw from torch's global generator, so a seeded run is reproducible and resumable):
:class:`RandomShift` (integer translations of images), :class:`GaussianNoise`,
:class:`RandomMask` (each input feature zeroed with probability p), :class:`RandomScale`
(per-sample intensity scaling), :class:`RandomResizedCrop` (a random box per sample, resized),
chained by :class:`Compose`; :func:`multi_crop` gives the global and local crops of SwAV and
DINO, one transform per view. :func:`shifted` applies them once, seeded, to a whole split: the
distribution-shifted test splits of a recipe's ``[evaluation] shifts``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from sdk.errors import ConfigError, ShapeError
from sdk.interfaces import Transform
from sdk.types import Batch

DATASETS = ("digits", "wine", "breast_cancer")
SOURCES = ("image_folder", "table", "arrays")  # a user's own data: see sdk.datasources


class IndexedDataset(TensorDataset):
    """``TensorDataset(x, y, arange(n))``: items are ``(x, y, index)``.

    ``index`` is the position in the *full* dataset the split was cut from, so state keyed by
    ``Batch.index`` stays valid across splits.
    """

    def __init__(self, x: Tensor, y: Tensor, index: Tensor | None = None):
        if x.shape[0] != y.shape[0]:
            raise ShapeError(f"IndexedDataset: x has {x.shape[0]} rows but y has {y.shape[0]}")
        index = torch.arange(x.shape[0]) if index is None else index.long()
        super().__init__(x, y, index)

    @property
    def x(self) -> Tensor:
        return self.tensors[0]

    @property
    def y(self) -> Tensor:
        return self.tensors[1]

    @property
    def index(self) -> Tensor:
        return self.tensors[2]


@attrs.frozen(kw_only=True)
class DataSplits:
    """Stratified splits of one dataset plus what a model needs to know about it."""

    name: str
    train: IndexedDataset
    calibration: IndexedDataset
    test: IndexedDataset
    num_classes: int
    in_dim: int
    image_shape: tuple[int, int] | None = None
    channels: int = 1
    classes: tuple[str, ...] | None = None
    unlabeled: IndexedDataset | None = None
    """The training samples :func:`reshape_training` left out (indices ``0..U-1``; their
    targets are those of the data, which the engine does not read from an unlabelled stream)."""


def stratified_split(y: Tensor, fractions: Sequence[float], seed: int = 0) -> list[Tensor]:
    """Split indices ``0..n-1`` into ``len(fractions) + 1`` disjoint parts, stratified by ``y``.

    Part ``k < len(fractions)`` receives ``round(fractions[k] * n_c)`` samples of each class
    ``c``; the last part the rest. The permutation is drawn from a generator seeded by ``seed``.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}",
                          param="fractions")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        start = 0
        for k, f in enumerate(fractions):
            count = int(round(f * members.numel()))
            parts[k].append(members[start:start + count])
            start += count
        parts[-1].append(members[start:])
    return [torch.cat(p).sort().values for p in parts]


def _sklearn(name: str) -> tuple[Tensor, Tensor]:
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sdk.data needs scikit-learn: pip install scikit-learn") from exc
    loaders = {"digits": datasets.load_digits, "wine": datasets.load_wine,
               "breast_cancer": datasets.load_breast_cancer}
    bunch = loaders[name]()
    return (torch.as_tensor(bunch.data, dtype=torch.float32),
            torch.as_tensor(bunch.target, dtype=torch.long))


def load(name: str = "digits", *, calibration_fraction: float = 0.2,
         test_fraction: float = 0.2, seed: int = 0, **options: Any) -> DataSplits:
    """Load a dataset as stratified ``train`` / ``calibration`` / ``test`` splits.

    ``name`` is a scikit-learn dataset (:data:`DATASETS`) or one of :data:`SOURCES`, read by
    :func:`sdk.datasources.read` with ``options`` (``path``, ``target``, ...). Images (digits'
    8x8, an image folder, image-shaped arrays) keep their values in ``[0, 1]``; tabular features
    (wine, breast_cancer, a table, ``[N, D]`` arrays) are standardised with the *training*
    split's mean and deviation.
    """
    classes: tuple[str, ...] | None = None
    channels = 1
    if name in SOURCES:
        from sdk import datasources

        source = datasources.read(name, **options)
        x, y, shape = source.x, source.y, source.image_shape
        classes, channels = source.classes, source.channels
    elif name in DATASETS:
        if options:
            raise ConfigError(f"dataset {name!r} takes no {', '.join(sorted(options))}; those "
                              f"belong to the sources {', '.join(SOURCES)}", param=sorted(options)[0])
        x, y = _sklearn(name)
        if name == "digits":
            x = x / 16.0
        shape = (8, 8) if name == "digits" else None
    else:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(DATASETS + SOURCES)}",
                          param="name")
    cal_idx, test_idx, train_idx = stratified_split(y, [calibration_fraction, test_fraction], seed)
    if shape is None:
        mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-8)
        x = (x - mean) / std

    def part(idx: Tensor) -> IndexedDataset:
        return IndexedDataset(x[idx], y[idx], idx)

    return DataSplits(name=name, train=part(train_idx), calibration=part(cal_idx),
                      test=part(test_idx), num_classes=int(y.max()) + 1, in_dim=x.shape[1],
                      image_shape=shape, channels=channels, classes=classes)


# the training split a recipe trains on ------------------------------------------------------

NOISE_SPLITS = ("train", "calibration", "test")


def flip_labels(y: Tensor, rate: float, num_classes: int, seed: int = 0) -> Tensor:
    """Symmetric label noise: each label, with probability ``rate``, replaced by a class drawn
    uniformly from the ``num_classes - 1`` others (seeded by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(y.shape, generator=g) < rate
    other = (y + torch.randint(1, num_classes, y.shape, generator=g)) % num_classes
    return torch.where(flip, other, y)


def long_tailed(y: Tensor, ratio: float, seed: int = 0) -> Tensor:
    """Indices of a long-tailed subset: class ``c`` of ``C`` (in class-id order) keeps
    ``max(1, round(n_c * ratio ** (-c / (C - 1))))`` of its ``n_c`` samples (drawn with a
    generator seeded by ``seed``), so the largest class has ``ratio`` times the smallest's."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    kept = []
    for rank, c in enumerate(classes.tolist()):
        members = torch.nonzero(y == c).flatten()
        share = ratio ** (-rank / max(len(classes) - 1, 1))
        count = max(1, int(round(members.numel() * share)))
        kept.append(members[torch.randperm(members.numel(), generator=g)[:count]])
    return torch.cat(kept).sort().values


def label_subset(y: Tensor, fraction: float, start: float = 0.0, seed: int = 0) -> Tensor:
    """Indices of a stratified part of ``y``: in a per-class order drawn with a generator
    seeded by ``seed``, class ``c``'s samples from ``round(start * n_c)`` on, at least one and
    ``round(fraction * n_c)`` of them. Parts with the same ``seed`` whose ``[start, start +
    fraction)`` ranges do not overlap share no sample."""
    if start + fraction > 1 + 1e-9:
        raise ConfigError(f"label_start + label_fraction must be <= 1, got {start} + {fraction}",
                          param="label_start")
    g = torch.Generator().manual_seed(seed)
    kept = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=g)]
        first = int(round(start * members.numel()))
        count = max(1, int(round(fraction * members.numel())))
        kept.append(members[first:first + count])
    return torch.cat(kept).sort().values


def reshape_training(splits: DataSplits, *, label_noise: float = 0.0,
                     noise_splits: Sequence[str] = ("train",), imbalance_ratio: float = 1.0,
                     label_fraction: float = 1.0, label_start: float = 0.0,
                     seed: int = 0) -> DataSplits:
    """``splits`` with symmetric ``label_noise`` in the ``noise_splits`` (:func:`flip_labels`,
    drawn per split before any subset is taken, so a sample's noisy label does not depend on
    the subset), then the training split made long-tailed (:func:`long_tailed`) and cut to a
    stratified part (:func:`label_subset`), both chosen by the true labels, so that a noisy
    part and a clean part with disjoint ranges share no sample. Samples keep their dataset
    indices."""
    unknown = sorted(set(noise_splits) - set(NOISE_SPLITS))
    if unknown:
        raise ConfigError(f"unknown split {unknown[0]!r}; the splits are "
                          f"{', '.join(NOISE_SPLITS)}", param="label_noise_splits")
    parts = {name: getattr(splits, name) for name in NOISE_SPLITS}
    if label_noise > 0:
        for k, name in enumerate(NOISE_SPLITS):
            if name in noise_splits:
                ds = parts[name]
                y = flip_labels(ds.y, label_noise, splits.num_classes, seed=seed * 3 + k + 1)
                parts[name] = IndexedDataset(ds.x, y, ds.index)
    train, true_y = parts["train"], splits.train.y
    keep = torch.arange(len(train))
    if imbalance_ratio > 1:
        keep = long_tailed(true_y, imbalance_ratio, seed)
    if label_fraction < 1 or label_start > 0:
        keep = keep[label_subset(true_y[keep], label_fraction, label_start, seed)]
    if keep.numel() < len(train):
        parts["train"] = IndexedDataset(train.x[keep], train.y[keep], train.index[keep])
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[keep] = False
        parts["unlabeled"] = IndexedDataset(train.x[rest], train.y[rest])
    return attrs.evolve(splits, **parts)


# augmentations ------------------------------------------------------------------------------


class Compose(Transform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        super().__init__()
        self.transforms = torch.nn.ModuleList(transforms)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        for t in self.transforms:
            x, batch = t(x, batch)
        return x, batch


class RandomShift(Transform):
    """Translate each image of ``[B, H*W]``, ``[B, C*H*W]`` (channels first, flattened),
    ``[B, H, W]`` or ``[B, C, H, W]`` by an integer offset drawn uniformly from
    ``[-max_shift, max_shift]`` per axis and sample (the same for its channels); vacated pixels
    are 0."""

    def __init__(self, shape: tuple[int, int] = (8, 8), max_shift: int = 1):
        super().__init__()
        if max_shift < 0:
            raise ConfigError(f"max_shift must be >= 0, got {max_shift}", param="max_shift")
        self.shape, self.max_shift = tuple(shape), max_shift

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        h, w = self.shape
        s = self.max_shift
        values = x.shape[1:].numel()
        if x.dim() < 2 or values == 0 or values % (h * w) or (x.dim() > 2 and x.shape[-2:] != (h, w)):
            raise ShapeError(f"RandomShift: expected images of {h}x{w} = {h * w} values per "
                             f"channel, got {list(x.shape)}")
        if s == 0:
            return x, batch
        b = x.shape[0]
        img = torch.nn.functional.pad(x.reshape(b, -1, h, w), (s, s, s, s)).permute(0, 2, 3, 1)
        dy, dx = torch.randint(-s, s + 1, (2, b, 1), device=x.device)
        rows = torch.arange(h, device=x.device) + s - dy  # [B, H]
        cols = torch.arange(w, device=x.device) + s - dx  # [B, W]
        out = img[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None],
                  cols[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).reshape(x.shape), batch


class GaussianNoise(Transform):
    """``x + std * eps``, ``eps ~ N(0, I)``."""

    def __init__(self, std: float = 0.1):
        super().__init__()
        if std < 0:
            raise ConfigError(f"std must be >= 0, got {std}", param="std")
        self.std = std

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        return x + self.std * torch.randn_like(x), batch


class RandomMask(Transform):
    """Zero each input value independently with probability ``p`` (no rescaling)."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"p must be in [0, 1), got {p}", param="p")
        self.p = p

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        return x * (torch.rand_like(x) >= self.p), batch


class RandomScale(Transform):
    """Multiply each sample by a factor drawn uniformly from ``[1 - amount, 1 + amount]``."""

    def __init__(self, amount: float = 0.2):
        super().__init__()
        if not 0.0 <= amount < 1.0:
            raise ConfigError(f"amount must be in [0, 1), got {amount}", param="amount")
        self.amount = amount

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        factor = 1 + self.amount * (2 * torch.rand(shape, device=x.device, dtype=x.dtype) - 1)
        return x * factor, batch


class RandomResizedCrop(Transform):
    """A box per sample covering a fraction of the image's area drawn uniformly from ``scale``,
    of aspect ratio log-uniform in ``ratio``, at a uniform position, resized bilinearly to
    ``size`` (default: the input's size); torchvision's ``RandomResizedCrop`` at tensor level,
    one batched ``grid_sample``.

    Images are ``[B, H*W]`` or ``[B, C*H*W]`` (flattened, of ``shape``), ``[B, H, W]`` or
    ``[B, C, H, W]``; the output
    keeps the layout (flattened inputs give flattened outputs of ``size``). Unlike torchvision,
    which retries a draw whose box does not fit, a box is clipped to the image (the area drawn
    is then an upper bound)."""

    def __init__(self, shape: tuple[int, int] = (8, 8), scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), size: tuple[int, int] | None = None):
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}",
                              param="scale")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"ratio must satisfy 0 < low <= high, got {tuple(ratio)}", param="ratio")
        if size is not None and min(size) < 1:
            raise ConfigError(f"size must be positive, got {tuple(size)}", param="size")
        self.shape, self.scale, self.ratio = tuple(shape), tuple(scale), tuple(ratio)
        self.size = tuple(size) if size is not None else tuple(shape)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        h, w = self.shape
        b = x.shape[0]
        if x.dim() == 2 and x.shape[1] % (h * w) == 0 and x.shape[1]:
            img = x.reshape(b, -1, h, w)
        elif x.dim() == 3 and x.shape[1:] == (h, w):
            img = x[:, None]
        elif x.dim() == 4 and x.shape[2:] == (h, w):
            img = x
        else:
            raise ShapeError(f"RandomResizedCrop: expected images [B, C*{h * w}], [B, {h}, {w}] or "
                             f"[B, C, {h}, {w}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"RandomResizedCrop: images must be floating point, got {x.dtype}")
        u = torch.rand(4, b, device=x.device, dtype=torch.float32)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * u[1])
        cw = torch.sqrt(area * aspect).clamp(max=1.0)  # box width / image width
        ch = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - cw) * (2 * u[2] - 1)  # box centre in [-1, 1] image coordinates
        cy = (1 - ch) * (2 * u[3] - 1)
        zero = torch.zeros_like(cw)
        theta = torch.stack([torch.stack([cw, zero, cx], 1), torch.stack([zero, ch, cy], 1)], 1)
        out_h, out_w = self.size
        grid = torch.nn.functional.affine_grid(theta.to(img.dtype), [b, img.shape[1], out_h, out_w],
                                               align_corners=False)
        out = torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                                              align_corners=False)
        if x.dim() == 2:
            return out.reshape(b, -1), batch
        return (out[:, 0] if x.dim() == 3 else out), batch


def multi_crop(shape: tuple[int, int], *, n_global: int = 2, n_local: int = 6,
               global_scale: tuple[float, float] = (0.14, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.14),
               local_size: tuple[int, int] | None = None,
               then: Transform | None = None) -> list[Transform]:
    """SwAV's and DINO's multi-crop: ``n_global`` crops of ``global_scale`` of the area at full
    size, then ``n_local`` crops of ``local_scale`` resized to ``local_size`` (default: the
    full size, since every view goes through one encoder), each followed by ``then`` (e.g. the
    recipes' noise). One transform per view, global views first, for ``Trainer(transforms=...)``.
    Scales are SwAV's defaults (DINO: 0.4-1 and 0.05-0.4).

    A local size below the image size needs an encoder that takes inputs of either size (the
    embeddings of all views must share one width, not the inputs); the ``mlp`` encoder takes
    one input size only."""
    if n_global < 1 or n_local < 0:
        raise ConfigError(f"multi_crop needs n_global >= 1 and n_local >= 0, got {n_global} and "
                          f"{n_local}", param="n_global")

    def view(scale: tuple[float, float], size: tuple[int, int] | None) -> Transform:
        crop = RandomResizedCrop(shape, scale=scale, size=size)
        return crop if then is None else Compose([crop, then])

    return ([view(global_scale, None) for _ in range(n_global)]
            + [view(local_scale, local_size) for _ in range(n_local)])


def augmentation(*, image_shape: tuple[int, int] | None = None, shift: int = 0,
                 noise: float = 0.0, mask: float = 0.0, scale: float = 0.0) -> Compose:
    """The view generator of the recipes: shift (images only), scale, mask, then noise."""
    parts: list[Transform] = []
    if shift:
        if image_shape is None:
            raise ConfigError("shift needs image data (digits); tabular data has no image shape",
                              param="shift")
        parts.append(RandomShift(image_shape, shift))
    if scale:
        parts.append(RandomScale(scale))
    if mask:
        parts.append(RandomMask(mask))
    if noise:
        parts.append(GaussianNoise(noise))
    return Compose(parts)


def shifted(dataset: IndexedDataset, *, image_shape: tuple[int, int] | None = None,
            seed: int = 0, shift: int = 0, noise: float = 0.0, mask: float = 0.0,
            scale: float = 0.0) -> IndexedDataset:
    """``dataset`` under a distribution shift: :func:`augmentation`'s transforms applied once to
    every input, drawn from a generator seeded by ``seed`` (the same shifted split for every run
    given the same seed; torch's global generator is left as it was); labels and indices kept.
    A recipe's ``[evaluation] shifts`` measure its test split so."""
    transform = augmentation(image_shape=image_shape, shift=shift, noise=noise, mask=mask,
                             scale=scale)
    if not transform.transforms:
        raise ConfigError("shifted: give shift, noise, mask or scale (nothing shifts the inputs)",
                          param="shift")
    x = dataset.x
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            out, _ = transform(x, Batch(targets=dataset.y, index=dataset.index))
    return IndexedDataset(out, dataset.y, dataset.index)
