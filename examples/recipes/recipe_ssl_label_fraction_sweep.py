"""Self-supervised pre-training against supervised training from scratch over label fractions,
after Ramesh et al., "Dissecting Self-Supervised Learning Methods for Surgical Computer Vision"
(arXiv:2207.00449), on scikit-learn's digits instead of Cholec80.

Each method pre-trains one encoder on the unlabelled training digits: SimCLR (``nt_xent``),
MoCo v2 composed from ``nt_xent`` and the ``queue`` teacher (a momentum key encoder whose keys
join every denominator), DINO (``dino`` with the ``dino_head`` encoder and an ``ema`` teacher)
and SwAV (``swav``). Then, with each fraction of the training labels, a stage that does not
train measures the frozen backbone (linear probe, kNN) and a stage fine-tunes the backbone under
a linear 10-class layer with cross-entropy. The ``scratch`` arm is the same staged recipe with
pre-training switched off (``stages[0].train = false``): its fine-tune is supervised training
from the random init. One staged recipe per method (pre-training once, then a probe and a
fine-tune stage per fraction), run in processes by :func:`sdk.sweep.run_sweep`, which writes
``sweep.csv`` (one row per method).

    python examples/recipes/recipe_ssl_label_fraction_sweep.py [RUN_DIR]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

from sdk import sweep
from sdk.config import structure

FRACTIONS = (0.01, 0.05, 0.1, 1.0)
BACKBONE = {"name": "mlp", "hidden_dims": [256], "out_dim": 32}
SIMCLR = {"objectives": [{"name": "nt_xent", "temperature": 0.2}]}
METHODS: dict[str, dict[str, Any]] = {
    "simclr": SIMCLR,
    "moco_v2": {**SIMCLR, "teacher": {"name": "queue", "size": 1024, "momentum": 0.99,
                                      "final_momentum": 0.99}},
    "dino": {"encoder": {"name": "dino_head", "hidden_dim": 256, "bottleneck_dim": 64,
                         "out_dim": 256, "backbone": BACKBONE},
             "objectives": [{"name": "dino", "student_temp": 0.1, "teacher_temp": 0.04}],
             "teacher": {"name": "ema", "momentum": 0.996}},
    "swav": {"objectives": [{"name": "swav", "dim": 64, "n_prototypes": 30}]},
}


def tag(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def recipe_data(method: str, *, pretrain_epochs: int, finetune_epochs: int,
                fractions: tuple[float, ...] = FRACTIONS, seed: int = 0) -> dict[str, Any]:
    """The staged recipe of one arm: ``method``'s pre-training (``"scratch"``: none), then per
    label fraction a probe stage and a fine-tune stage, both starting from the pre-trained
    encoder's backbone."""
    pretrain = {"name": "pretrain", **copy.deepcopy(METHODS.get(method, SIMCLR)),
                "train": method != "scratch", "trainer": {"max_epochs": pretrain_epochs},
                "evaluation": {"linear_probe": False}}  # the probe stages measure it
    stages = [pretrain]
    for f in fractions:
        stages.append({"name": f"probe_{tag(f)}", "init": "pretrain", "init_keys": ["backbone"],
                       "train": False, "data": {"label_fraction": f}})
        stages.append({"name": f"finetune_{tag(f)}", "init": "pretrain", "init_keys": ["backbone"],
                       "encoder": {"name": "projection_head", "layers": 1, "out_dim": 10,
                                   "backbone": BACKBONE},
                       "objectives": [{"name": "cross_entropy"}],
                       "data": {"label_fraction": f, "batch_size": 64,
                                "augment": {"shift": 1, "noise": 0.05}},
                       "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
                       "trainer": {"max_epochs": finetune_epochs}})
    return {"name": f"recipe_ssl_label_fraction_sweep_{method}", "seed": seed,
            "data": {"name": "digits", "batch_size": 256,
                     "augment": {"shift": 1, "scale": 0.2, "mask": 0.2, "noise": 0.1}},
            "encoder": {"name": "projection_head", "hidden_dim": 256, "out_dim": 64,
                        "backbone": BACKBONE},
            **copy.deepcopy(SIMCLR),  # the probe stages' kind: self-supervised (kNN, probe)
            "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4},
            "trainer": {"log_every": 100},
            "evaluation": {"random_init": False},
            "stages": stages}


def main(fast: bool = False, seed: int = 0, run_dir: str | Path | None = None,
         jobs: int | None = None) -> dict[str, dict[str, float]]:
    """Run every arm; returns ``{arm: {"probe_<f>": linear-probe accuracy, "finetune_<f>":
    fine-tuned accuracy, "knn_<f>": kNN accuracy}}`` on the test split. ``fast``: SimCLR
    against scratch at 5% of the labels, few epochs."""
    arms = ("simclr", "scratch") if fast else (*METHODS, "scratch")
    fractions = (0.05,) if fast else FRACTIONS
    epochs = {"pretrain_epochs": 20, "finetune_epochs": 10} if fast else {
        "pretrain_epochs": 100, "finetune_epochs": 60}
    points = [sweep.Point(values={"method": arm}, name=arm, recipe=structure(
        recipe_data(arm, fractions=fractions, seed=seed, **epochs))) for arm in arms]
    out = Path(run_dir or tempfile.mkdtemp(prefix="recipe_ssl_label_fraction_sweep-"))
    rows = sweep.run_sweep(points, out, jobs=jobs, metric=f"finetune_{tag(fractions[0])}/accuracy")
    return {row["method"]: {f"{kind}_{tag(f)}": row[f"{stage}_{tag(f)}/{key}"]
                            for f in fractions
                            for kind, stage, key in (("probe", "probe", "linear_probe_accuracy"),
                                                     ("knn", "probe", "knn_accuracy"),
                                                     ("finetune", "finetune", "accuracy"))}
            for row in rows}


if __name__ == "__main__":
    results = main(run_dir=sys.argv[1] if len(sys.argv) > 1 else None)
    columns = list(next(iter(results.values())))
    print("arm      " + " ".join(f"{c:>15}" for c in columns))
    for arm, values in results.items():
        print(f"{arm:<8} " + " ".join(f"{values[c]:>15.3f}" for c in columns))
