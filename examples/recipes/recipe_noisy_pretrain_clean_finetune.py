"""Noisy pre-training then clean fine-tuning against knowledge distillation, on digits.

Reproduces the comparison of Neupane, Aryal & Rajabifard, "Supervised domain adaptation for
building extraction from off-nadir aerial images" (arXiv:2311.03867), seed entry [73]: a model
trained on a large set with noisy labels (70% of the training split, 30% of its labels wrong) is
fine-tuned, every weight, on a small clean set (the disjoint next 10%) at a tenth of the
learning rate (supervised domain adaptation, SDA: the stages of
``recipe_noisy_pretrain_clean_finetune.toml``), against the paper's teacher-student baseline that
composes from the registered plugins: knowledge distillation (``knowledge_distillation`` of
Hinton et al., at the plugin's T = 4, alpha = 0.9) of the noisy-trained model, frozen as the
teacher, into a student trained from scratch on the clean set at the first stage's learning
rate. For context it also trains the same network on the clean set alone, at that rate too.
Deep mutual learning, the paper's other baseline, has no plugin here and is left out.

    python examples/recipes/recipe_noisy_pretrain_clean_finetune.py   # full: 3 seeds

A recipe cannot name a trained stage as its teacher (``sdk.classification.FrozenTeacher`` wraps
a trained model and is not a registered plugin), which is why this comparison is a script.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

RECIPE = Path(__file__).with_suffix(".toml")
FAST = ["stages[0].trainer.max_epochs=10", "stages[1].trainer.max_epochs=15"]
KD = {"name": "knowledge_distillation", "temperature": 4.0, "alpha": 0.9}


def _from_scratch(stage_recipe, lr: float, objective: dict):
    """The clean stage's recipe with a fresh encoder, ``objective`` and learning rate ``lr``."""
    from sdk.config import structure, unstructure

    data = unstructure(stage_recipe)
    data["objectives"] = [objective]
    return structure({**data, "optimizer": {**data["optimizer"], "lr": lr}})


def main(fast: bool = False, seed: int = 0) -> dict:
    """Test accuracy (clean test split) of the noisy-trained model, of it fine-tuned on the
    clean part (SDA), of a student distilled from it on the clean part (KD), and of the network
    trained on the clean part alone; ``fast``: fewer epochs (the test)."""
    from torch.utils.data import DataLoader

    from sdk import checkpoint, metrics
    from sdk.classification import FrozenTeacher
    from sdk.cli_run import build, load_splits, make_trainer, run, run_recipe
    from sdk.config import load_recipe
    from sdk.stages import ENCODER

    recipe = load_recipe(RECIPE, [f"seed={seed}", f"data.split_seed={seed}",
                                  *(FAST if fast else [])])
    noisy, clean = recipe.stages
    with tempfile.TemporaryDirectory() as tmp:
        sda = run(recipe, run_dir=tmp, progress=False)
        teacher_state = checkpoint.load(Path(tmp) / noisy.options.name / ENCODER)
        scratch = run_recipe(_from_scratch(clean.recipe, recipe.optimizer.lr,
                                           {"name": "cross_entropy"}),
                             run_dir=Path(tmp) / "scratch", progress=False)

    # knowledge distillation: the noisy stage's model, frozen, teaches a fresh student on the
    # clean part (T = 4, alpha = 0.9 on the soft term)
    student = _from_scratch(clean.recipe, recipe.optimizer.lr, KD)
    splits = load_splits(student.data)
    teacher = build(noisy.recipe, load_splits(noisy.recipe.data))["encoder"]
    teacher.load_state_dict(teacher_state)
    parts = {**build(student, splits), "teacher": FrozenTeacher(teacher)}
    trainer = make_trainer(student, parts, progress=False)
    trainer.fit(DataLoader(splits.train, batch_size=student.data.batch_size, shuffle=True,
                           drop_last=len(splits.train) > student.data.batch_size))
    test = DataLoader(splits.test, batch_size=512)
    kd = metrics.accuracy(trainer.predict(test), splits.test.y.to(trainer.device))
    return {"noisy_trained": sda[f"{noisy.options.name}/accuracy"],
            "sda_finetuned": sda[f"{clean.options.name}/accuracy"],
            "kd_student": kd, "clean_only": scratch["accuracy"],
            "n_noisy": sda[f"{noisy.options.name}/n_train"],
            "n_clean": sda[f"{clean.options.name}/n_train"]}


if __name__ == "__main__":
    rows = [main(seed=s) for s in (0, 1, 2)]
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(f"{key}: mean {statistics.mean(values):.3f} (seeds 0, 1, 2: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
