"""recipe_ssl_benchmark_robustness (seed paper 167, arXiv:2412.19124): each self-supervised
method's encoder is measured (kNN, linear probe) with 1%, 10% and 100% of the labels on the clean
test split and under each shift of [evaluation] shifts; the sweep's table holds every method x
label fraction x shift, and every shift costs accuracy."""

import json
from pathlib import Path

from sdk import sweep

RECIPE = (Path(__file__).parents[2] / "examples" / "recipes"
          / "recipe_ssl_benchmark_robustness.toml")
SHIFTS = ("noise", "mask", "pixels")
STAGES = ("labels_1pct", "labels_10pct", "labels_100pct")


def test_the_recipe_sweeps_four_methods_each_measured_at_three_label_fractions():
    grid = sweep.points(RECIPE)
    assert [p.recipe.objectives[0].name for p in grid] == [
        "nt_xent", "swav", "vicreg", "barlow_twins"]
    stages = grid[0].recipe.stages
    assert [s.options.name for s in stages] == ["pretrain", *STAGES]
    assert [s.recipe.data.label_fraction for s in stages] == [1.0, 0.01, 0.1, 1.0]
    assert all(not s.options.train and s.options.init == "pretrain" for s in stages[1:])
    assert set(stages[0].recipe.evaluation.shifts) == set(SHIFTS)


def test_the_table_lists_every_label_fraction_and_shift_and_each_shift_costs_accuracy(tmp_path):
    grid = sweep.points(RECIPE, ["stages[0].trainer.max_epochs=3"],
                        ['objectives=[[{ name = "vicreg" }]]'])
    sweep.run_sweep(grid, tmp_path, jobs=1)
    rows = json.loads((tmp_path / sweep.SWEEP_JSON).read_text())
    assert [r["objectives"][0]["name"] for r in rows] == ["vicreg"]
    for row in rows:
        for stage in STAGES:
            for metric in ("knn_accuracy", "linear_probe_accuracy"):
                clean = row[f"{stage}/{metric}"]
                for shift in SHIFTS:
                    assert row[f"{stage}/shift/{shift}/{metric}"] < clean, (stage, shift, metric)
        assert row["labels_1pct/linear_probe_accuracy"] < row["labels_100pct/linear_probe_accuracy"]
