"""Sweeps: the grid of points and its checks, the runs in parallel processes, the table and
plot, and a second run of the same sweep that reads finished points and resumes the others."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sdk import sweep
from sdk.cli import main
from sdk.config import read_recipe
from sdk.errors import ConfigError

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "supervised_digits.toml"


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    monkeypatch.setenv("CI", "1")


def test_sweep_arguments_read_toml_values_or_strings():
    assert sweep.parse_sweep("optimizer.lr=1e-3, 0.01") == ("optimizer.lr", [1e-3, 0.01])
    assert sweep.parse_sweep("objectives[0].temperature=[0.1, 0.5]") == (
        "objectives[0].temperature", [0.1, 0.5])
    assert sweep.parse_sweep("optimizer.name=adamw,sgd") == ("optimizer.name", ["adamw", "sgd"])
    with pytest.raises(ConfigError, match="--sweep expects KEY=V1,V2"):
        sweep.parse_sweep("optimizer.lr")
    with pytest.raises(ConfigError, match=r"sweep.optimizer.lr: a value is given twice"):
        sweep.parse_sweep("optimizer.lr=0.1,0.1")
    with pytest.raises(ConfigError, match=r"sweep.optimizer.lr: expected a non-empty array"):
        sweep.sweep_table({"sweep": {"optimizer.lr": []}})


def test_points_are_the_grid_each_checked_before_anything_runs():
    data = {**read_recipe(RECIPE), "sweep": {"optimizer.lr": [1e-3, 1e-2], "seed": [0, 1]}}
    grid = sweep.points(data, ["trainer.max_steps=2"], ["seed=3,4,5"])  # the flag replaces seed
    assert [dict(p.values) for p in grid] == [
        {"optimizer.lr": lr, "seed": s} for lr in (1e-3, 1e-2) for s in (3, 4, 5)]
    assert [(p.recipe.optimizer.lr, p.recipe.seed, p.recipe.trainer.max_steps) for p in grid] == [
        (lr, s, 2) for lr in (1e-3, 1e-2) for s in (3, 4, 5)]
    assert grid[0].name == "optimizer.lr=0.001,seed=3"
    assert sweep.points(read_recipe(RECIPE)) == []  # nothing swept: a plain run
    with pytest.raises(ConfigError,
                       match=r'^sweep point optimizer.lr="fast", seed=0: optimizer.lr: expected float'):
        sweep.points(data, sweeps=["optimizer.lr=fast,slow"])
    with pytest.raises(ConfigError, match=r"trainer.max_stepz") as info:
        sweep.points(data, sweeps=["trainer.max_stepz=1,2"])
    assert info.value.path == "trainer.max_stepz"


def test_a_sweep_runs_its_points_in_processes_and_a_second_run_reads_or_resumes_them(
        tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["run", str(RECIPE), "--run-dir", str(out), "--set", "trainer.max_steps=2",
            "--set", "data.augment.noise=0.0"]
    assert main([*argv, "--sweep", "optimizer.lr=1e-3,3e-2", "--jobs", "2"]) == 0
    assert "sweep of 2 runs" in capsys.readouterr().out
    rows = json.loads((out / sweep.SWEEP_JSON).read_text())
    names = ["optimizer.lr=0.001", "optimizer.lr=0.03"]
    for row, name, lr in zip(rows, names, (1e-3, 3e-2)):
        summary = json.loads((out / name / "summary.json").read_text())
        assert row["optimizer.lr"] == lr and row["accuracy"] == summary["accuracy"]
        assert row["train/steps"] == summary["train/steps"] == 2
    table = list(csv.DictReader((out / sweep.SWEEP_CSV).open()))
    assert [float(r["accuracy"]) for r in table] == [r["accuracy"] for r in rows]
    assert (out / sweep.SWEEP_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a point run in processes equals the same recipe run here
    single = tmp_path / "single"
    assert main([*argv[:2], "--run-dir", str(single), *argv[4:], "--set", "optimizer.lr=0.03"]) == 0
    assert json.loads((single / "summary.json").read_text())["accuracy"] == rows[1]["accuracy"]

    # again, from a [sweep] table: the finished point is read, the other resumed from its
    # checkpoint (its summary removed, as a run killed before evaluation leaves it)
    finished = (out / names[0] / "summary.json").stat().st_mtime_ns
    (out / names[1] / "summary.json").unlink()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.read_text() + '\n[sweep]\n"optimizer.lr" = [1e-3, 3e-2]\n')
    assert main(["run", str(recipe), *argv[2:], "--jobs", "1", "--metric", "nll_after"]) == 0
    assert (out / names[0] / "summary.json").stat().st_mtime_ns == finished
    again = json.loads((out / sweep.SWEEP_JSON).read_text())
    assert again[0] == rows[0]
    evaluated = ("accuracy", "ece_before", "ece_after", "nll_before", "nll_after")
    assert {k: again[1][k] for k in evaluated} == {k: rows[1][k] for k in evaluated}
    capsys.readouterr()
    assert main(["run", "--resume", str(out / names[0]), "--sweep", "seed=1,2"]) == 2
    assert "--sweep goes with a RECIPE" in capsys.readouterr().err
    assert main(["run", str(recipe), *argv[2:], "--jobs", "1", "--metric", "nope"]) == 2
    assert "--metric nope: not in every point's summary" in capsys.readouterr().err


def test_a_swept_value_may_be_an_array_of_tables(tmp_path):
    mixup = [{"name": "mixup", "alpha": 1.0}]
    grid = sweep.points({**read_recipe(RECIPE), "sweep": {"transforms": [[], mixup]}})
    assert [[t.name for t in p.recipe.transforms] for p in grid] == [[], ["mixup"]]
    assert grid[1].recipe.transforms[0].params == {"alpha": 1.0}
    assert grid[0].name != grid[1].name and "/" not in grid[1].name
    rows = [{"transforms": [], "accuracy": 0.5}, {"transforms": mixup, "accuracy": 0.6}]
    sweep.write_table(rows, ["transforms"], tmp_path)
    table = list(csv.DictReader((tmp_path / sweep.SWEEP_CSV).open()))
    assert [r["transforms"] for r in table] == ["[]", '[{ name = "mixup", alpha = 1.0 }]']
    for keys in (["transforms"], ["seed", "transforms"]):  # on the x axis, or one line each
        rows = [{**r, "seed": 0} for r in rows]
        png = sweep.plot(rows, keys, "accuracy", tmp_path / f"{len(keys)}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
