# Multi-level image-text contrastive pretraining: Kim, Angelova & Kuo, "Detection-Oriented
# Image-Text Pretraining for Open-Vocabulary Detection" (DITO), arXiv:2310.00161, its
# detector-oriented signal without pseudo-labels at toy scale: every level of a multi-level image
# encoder, pooled over the whole-image box, is contrasted with the paired text embedding.
#
# Run the full version:  PYTHONPATH=. python examples/recipes/recipe_multilevel_image_text_contrastive.py
# (the fast version is main(fast=True), which tests/recipes/ runs).
"""Digits images (modality A) paired with their 16 row and column mean intensities (modality B,
the "text"; ``sdk.multimodal.intensity_profiles``). The image encoder has ``L = 3`` conv stages
(8x8 -> 8x8 -> 4x4 -> 2x2); each level's feature map is average-pooled over the whole image (the
whole-image box of the paper's RoI-Align) and projected by its own head into the text tower's
embedding space. One ``multi_tower`` encoder holds a tower per level (sharing the stages) and
the text tower; the views are the image for each level and the profile.

* ``multilevel``: ``sum_l clip(level l, text)``, the objective algebra over
  ``clip_improved_baseline`` terms with ``pair = (l, L)`` (CLIP's loss: label smoothing 0, each
  level with its own learnable temperature);
* ``last_level``: the last level's term only (CLIP on the top of the encoder).

Measured on the test split, for every level ``l``: cross-modal retrieval R@1 (``cross_modal_recall``)
of the level's trained head against the text embeddings, and a retrieval probe of the level's
pooled features: a ridge map from the features to the (unit) text embeddings fitted on the
training split, then R@1 of the mapped test features (fair to the ``last_level`` arm, whose
intermediate heads never train).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.interfaces import Encoder
from sdk.multimodal import PairedDataset, TowerView, cross_modal_recall, for_tower, intensity_profiles

FULL = dict(epochs=30, seeds=(0, 1, 2))
FAST = dict(epochs=5, seeds=(0,))
CHANNELS, OUT, BATCH, RIDGE = (16, 32, 64), 32, 128, 1e-2


class Levels(nn.Module):
    """Conv stages on ``[B, 64]`` digits; ``forward(x, level)`` is the level's map pooled over
    the whole image, ``[B, C_level]``."""

    def __init__(self):
        super().__init__()
        widths = (1, *CHANNELS)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1),
                          nn.BatchNorm2d(b), nn.ReLU())
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        h = x.reshape(-1, 1, 8, 8)
        for stage in self.stages[:level + 1]:
            h = stage(h)
        return h.mean(dim=(2, 3))  # the whole-image box


class LevelTower(Encoder):
    """Tower of one level: the shared stages up to it, then the level's projection head."""

    def __init__(self, levels: Levels, level: int):
        super().__init__()
        self.levels, self.level, self.in_dim, self.out_dim = levels, level, 64, OUT
        width = CHANNELS[level]
        self.head = nn.Sequential(nn.Linear(width, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                  nn.Linear(64, OUT))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels(x, self.level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TextTower(Encoder):
    """The profile's tower: Linear, BatchNorm, ReLU, Linear."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, OUT
        self.net = nn.Sequential(nn.Linear(in_dim, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Linear(64, OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def paired_digits(split_seed: int = 0) -> tuple[PairedDataset, PairedDataset]:
    splits = sdk.data.load("digits", calibration_fraction=0.0, test_fraction=0.25, seed=split_seed)
    return tuple(PairedDataset(s.x, intensity_profiles(s.x, splits.image_shape), s.y, s.index)
                 for s in (splits.train, splits.test))


def ridge_probe_recall(h_train, t_train, h_test, t_test) -> float:
    """R@1 of test features mapped by the ridge regression of the unit text embeddings on the
    (standardised) training features."""
    mean, std = h_train.mean(0), h_train.std(0) + 1e-6
    a = torch.cat([(h_train - mean) / std, torch.ones(len(h_train), 1)], dim=1).double()
    target = F.normalize(t_train, dim=1).double()
    w = torch.linalg.solve(a.T @ a + RIDGE * len(a) * torch.eye(a.shape[1], dtype=a.dtype),
                           a.T @ target)
    mapped = torch.cat([(h_test - mean) / std, torch.ones(len(h_test), 1)], dim=1).double() @ w
    return cross_modal_recall(mapped, t_test.double())


def train_arm(arm: str, train: PairedDataset, test: PairedDataset, *, epochs: int,
              seed: int) -> dict[str, list[float]]:
    """Train ``"multilevel"`` or ``"last_level"``; per level, test R@1 of its head and of the
    ridge probe of its features."""
    torch.manual_seed(seed)
    levels = Levels()
    n = len(CHANNELS)
    towers = [LevelTower(levels, level) for level in range(n)] + [TextTower(train.paired.shape[1])]
    encoder = sdk.create("encoder", "multi_tower", towers=towers)
    if arm == "multilevel":
        views = [TowerView(level) for level in range(n)] + [TowerView(n, paired=True)]
        objective = sum(sdk.create("objective", "clip_improved_baseline", label_smoothing=0.0,
                                   pair=(level, n)) for level in range(n))
    elif arm == "last_level":
        views = [TowerView(n - 1), TowerView(n, paired=True)]
        objective = sdk.create("objective", "clip_improved_baseline", label_smoothing=0.0)
    else:
        raise ValueError(f"recipe_multilevel_image_text_contrastive: unknown arm {arm!r}")
    trainer = sdk.Trainer(encoder, objective, lambda ps: torch.optim.AdamW(ps, lr=2e-3),
                          transforms=views, max_epochs=epochs, seed=seed, progress=False,
                          device="cpu")
    trainer.fit(DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True))
    encoder.eval()
    out: dict[str, list[float]] = {"head_r1": [], "probe_r1": []}
    with torch.no_grad():
        t_train, t_test = (encoder(for_tower(d.paired, n)) for d in (train, test))
        for level in range(n):
            z = encoder(for_tower(test.x, level))
            out["head_r1"].append(cross_modal_recall(z, t_test))
            h_train, h_test = (encoder.features(for_tower(d.x, level)) for d in (train, test))
            out["probe_r1"].append(ridge_probe_recall(h_train, t_train, h_test, t_test))
    return out


def main(fast: bool = False, seed: int = 0) -> dict:
    """``{arm: {"head_r1": [[per level] per seed], "probe_r1": [...]}}`` and ``"chance"``."""
    cfg = FAST if fast else FULL
    train, test = paired_digits()
    result: dict = {"chance": 1 / len(test)}
    for arm in ("multilevel", "last_level"):
        runs = [train_arm(arm, train, test, epochs=cfg["epochs"], seed=seed + s)
                for s in cfg["seeds"]]
        result[arm] = {k: [r[k] for r in runs] for k in runs[0]}
    return result


if __name__ == "__main__":
    result = main()
    print(f"digits + intensity profiles, test R@1 per level (chance {result['chance']:.4f}), "
          f"{FULL['epochs']} epochs, seeds {FULL['seeds']}")
    for arm in ("multilevel", "last_level"):
        for key in ("head_r1", "probe_r1"):
            runs = result[arm][key]
            means = [sum(r[level] for r in runs) / len(runs) for level in range(len(CHANNELS))]
            seeds = "; ".join(" ".join(f"{v:.3f}" for v in r) for r in runs)
            print(f"{arm:11s} {key:9s} mean by level {' '.join(f'{m:.3f}' for m in means)}"
                  f"   (per seed: {seeds})")
