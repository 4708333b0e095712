# Improved CLIP baselines: Fini, Astolfi, Romero-Soriano, Verbeek & Drozdzal, "Improved baselines
# for vision-language pre-training", TMLR 2023 (arXiv:2305.08675), its training-recipe ablation
# at toy scale: image-"text" contrastive pretraining on digits paired with intensity profiles.
#
# Run the full version:  PYTHONPATH=. python examples/recipes/clip_improved_baseline.py
# (the fast version is main(fast=True), which tests/recipes/ runs).
"""Two modalities of each digits image: the 8x8 image (tower 0) and its 16 row and column mean
intensities (tower 1, the "text"), encoded by a two-tower ``multi_tower`` encoder and trained
with ``clip_improved_baseline`` (CLIP's symmetric InfoNCE, learnable temperature from 0.07, scale
clipped at 100). Four arms, as the paper's recipe ablation adds its improvements to CLIP:

* ``clip``: label smoothing 0, no augmentation (CLIP's loss);
* ``+label_smoothing``: the targets smoothed with 0.1;
* ``+augmentations``: augmentation of both modalities (5% of the image's pixels masked, Gaussian
  noise of 0.05; 5% of the profile's entries dropped and noise of 0.02, the analogue of the
  paper's text augmentation by random deletion; shifting the image, which changes its profile,
  breaks the pairing and takes retrieval R@1 from 0.99 to 0.33);
* ``clip_rocket``: both (the paper's improved recipe, CLIP🚀, less its text-encoder dropout and
  MLP projectors).

Measured on the held-out test split: cross-modal retrieval (an image's profile among all test
profiles and back; recall at 1 and 5, averaged over both directions; chance 1/N) and zero-shot
classification, the paper's headline measure: each class's "prompt" is the mean text-tower
embedding of its training profiles, and a test image takes the class of the most similar prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import sdk
from sdk.data import augmentation
from sdk.multimodal import PairedDataset, TowerView, cross_modal_recall, for_tower, intensity_profiles

ARMS = {
    "clip": dict(label_smoothing=0.0, augment=False),
    "+label_smoothing": dict(label_smoothing=0.1, augment=False),
    "+augmentations": dict(label_smoothing=0.0, augment=True),
    "clip_rocket": dict(label_smoothing=0.1, augment=True),
}
FULL = dict(epochs=40, seeds=(0, 1, 2), arms=tuple(ARMS))
FAST = dict(epochs=8, seeds=(0,), arms=("clip", "clip_rocket"))
BATCH, HIDDEN, OUT = 128, 128, 32
IMAGE_AUG = dict(mask=0.05, noise=0.05)
TEXT_AUG = dict(mask=0.05, noise=0.02)


def paired_digits(split_seed: int = 0) -> tuple[PairedDataset, PairedDataset]:
    """Train and test splits of digits, each image paired with its intensity profiles."""
    splits = sdk.data.load("digits", calibration_fraction=0.0, test_fraction=0.25, seed=split_seed)

    def pair(split):
        return PairedDataset(split.x, intensity_profiles(split.x, splits.image_shape), split.y,
                             split.index)
    return pair(splits.train), pair(splits.test)


def train_arm(arm: str, train: PairedDataset, test: PairedDataset, *, epochs: int,
              seed: int) -> dict[str, float]:
    """Train one arm from seed ``seed``; its test retrieval and final logit scale."""
    options = ARMS[arm]
    torch.manual_seed(seed)
    encoder = sdk.create("encoder", "multi_tower", in_dims=(train.x.shape[1], train.paired.shape[1]),
                         hidden_dim=HIDDEN, out_dim=OUT)
    objective = sdk.create("objective", "clip_improved_baseline",
                           label_smoothing=options["label_smoothing"])
    image_aug = augmentation(image_shape=(8, 8), **IMAGE_AUG) if options["augment"] else None
    text_aug = augmentation(**TEXT_AUG) if options["augment"] else None
    trainer = sdk.Trainer(encoder, objective, lambda ps: torch.optim.AdamW(ps, lr=2e-3),
                          transforms=[TowerView(0, augment=image_aug),
                                      TowerView(1, paired=True, augment=text_aug)],
                          max_epochs=epochs, seed=seed, progress=False, device="cpu")
    trainer.fit(DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True))
    encoder.eval()
    with torch.no_grad():
        za, zb = encoder(for_tower(test.x, 0)), encoder(for_tower(test.paired, 1))
        prompts = F.normalize(encoder(for_tower(train.paired, 1)), dim=1)
        classes = F.normalize(torch.stack([prompts[train.y == c].mean(0)
                                           for c in range(int(train.y.max()) + 1)]), dim=1)
        zero_shot = float(((F.normalize(za, dim=1) @ classes.T).argmax(1) == test.y).float().mean())
    return {"r1": cross_modal_recall(za, zb, k=1), "r5": cross_modal_recall(za, zb, k=5),
            "zero_shot": zero_shot,
            "scale": float(objective.log_scale.detach().exp())}


def main(fast: bool = False, seed: int = 0) -> dict:
    """Test measures of every arm and seed: ``{arm: {"r1", "r5", "zero_shot", "scale": [...]}}``
    plus ``"chance"`` (1 / test size)."""
    cfg = FAST if fast else FULL
    train, test = paired_digits()
    out: dict = {"chance": 1 / len(test)}
    for arm in cfg["arms"]:
        runs = [train_arm(arm, train, test, epochs=cfg["epochs"], seed=seed + s) for s in cfg["seeds"]]
        out[arm] = {k: [r[k] for r in runs] for k in runs[0]}
    return out


if __name__ == "__main__":
    result = main()
    print(f"digits + intensity profiles, test retrieval (chance {result['chance']:.4f}), "
          f"{FULL['epochs']} epochs, seeds {FULL['seeds']}")
    print(f"{'arm':18s} {'R@1':>6s} {'R@1 per seed':>20s} {'R@5':>6s} {'0-shot':>7s} "
          f"{'0-shot per seed':>20s} {'scale':>6s}")
    for arm in FULL["arms"]:
        r = result[arm]
        mean = {k: sum(v) / len(v) for k, v in r.items()}
        print(f"{arm:18s} {mean['r1']:6.3f} {' '.join(f'{v:.3f}' for v in r['r1']):>20s} "
              f"{mean['r5']:6.3f} {mean['zero_shot']:7.3f} "
              f"{' '.join(f'{v:.3f}' for v in r['zero_shot']):>20s} {mean['scale']:6.1f}")
