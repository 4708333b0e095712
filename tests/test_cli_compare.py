"""``paperplug compare``: two recipes under one budget; the table holds what the registered metric
plugins measure on the saved runs (and on the random-init encoder); bad recipes fail first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sdk
from sdk import checkpoint
from sdk.cli import main
from sdk.cli_run import prepare
from sdk.config import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
COLUMNS = ["method", "recipe", "kNN accuracy", "linear-probe accuracy", "RankMe", "training time"]


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    monkeypatch.setenv("CI", "1")


def measured(run_dir: Path, *, trained: bool) -> dict[str, float]:
    """kNN, linear probe and RankMe by the metric plugins, of the run's saved checkpoint (or of
    its encoder at initialisation), on the backbone features as the run evaluates them."""
    from torch.utils.data import DataLoader

    recipe = load_recipe(run_dir / "config.toml")
    splits, _, _, trainer = prepare(recipe, progress=False)
    if trained:
        saved = checkpoint.load(checkpoint.checkpoint_files(run_dir / "checkpoints")[-1])
        trainer.encoder.load_state_dict(saved["components"]["encoder"])

    def embed(ds):
        return trainer.embed(DataLoader(ds, batch_size=512), features=True, with_targets=True)

    (tr, ytr), (te, yte) = embed(splits.train), embed(splits.test)
    knn = sdk.create("metric", "knn_accuracy", k=recipe.evaluation.knn_k,
                     temperature=recipe.evaluation.knn_temperature).fit(tr, ytr)
    knn.update(te, yte)
    probe = sdk.create("metric", "linear_probe").fit(tr, ytr)
    probe.update(te, yte)
    rank = sdk.create("metric", "rankme")
    rank.update(tr)
    return {"knn": knn.compute(), "probe": probe.compute(), "rankme": rank.compute()}


def table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def test_two_recipes_one_budget_tabulated(tmp_path, capsys):
    recipes = ["simclr_digits", "vicreg_digits"]
    code = main(["compare", *(str(RECIPES / f"{r}.toml") for r in recipes), "--epochs", "1",
                 "--seed", "3", "--out", str(tmp_path), "--set", "trainer.max_steps=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[1/2] simclr_digits (nt_xent): 1 epochs" in out
    assert "[2/2] vicreg_digits (vicreg): 1 epochs" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["dataset"], results["epochs"], results["seed"]) == ("digits", 1, 3)
    rows = results["rows"]
    assert [(r["method"], r["recipe"]) for r in rows] == [("nt_xent", "simclr_digits"),
                                                         ("vicreg", "vicreg_digits")]
    md = table((tmp_path / "results.md").read_text())
    assert md[0] == COLUMNS
    by_name = {line[1]: line for line in md[2:]}
    baseline = [line for line in md if line[0] == "random-init encoder"]
    assert len(baseline) == 1  # both recipes' backbones start from the same seed and shape
    for row in rows:
        run_dir = tmp_path / row["recipe"]
        recipe = load_recipe(run_dir / "config.toml")
        assert (recipe.name, recipe.objectives[0].name) == (row["recipe"], row["method"])
        assert (recipe.trainer.max_epochs, recipe.seed) == (1, 3)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["train/steps"] == 2
        assert row["train_time_s"] == summary["train/wall_time_s"] > 0
        assert row["wall_time_s"] == summary["wall_time_s"] > row["train_time_s"]
        got = measured(run_dir, trained=True)
        assert row["knn_accuracy"] == pytest.approx(got["knn"], abs=1e-9)
        assert row["linear_probe_accuracy"] == pytest.approx(got["probe"], abs=1e-6)
        assert row["rankme"] == pytest.approx(got["rankme"], rel=1e-6)
        init = measured(run_dir, trained=False)
        assert row["random_init_knn_accuracy"] == pytest.approx(init["knn"], abs=1e-9)
        assert row["random_init_linear_probe_accuracy"] == pytest.approx(init["probe"], abs=1e-6)
        assert row["random_init_rankme"] == pytest.approx(init["rankme"], rel=1e-6)
        assert row["knn_accuracy"] != row["random_init_knn_accuracy"]  # trained, not the init
        assert by_name[row["recipe"]] == [
            row["method"], row["recipe"], f"{got['knn']:.3f}", f"{got['probe']:.3f}",
            f"{got['rankme']:.1f}", f"{row['train_time_s']:.0f} s"]
        assert baseline[0][2:5] == [f"{init['knn']:.3f}", f"{init['probe']:.3f}",
                                    f"{init['rankme']:.1f}"]
    assert ["raw inputs", "—", f"{rows[0]['input_knn_accuracy']:.3f}", "—", "—", "—"] in md


def fail(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    return code, captured.err


def test_bad_recipes_fail_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    simclr = str(RECIPES / "simclr_digits.toml")
    code, err = fail(capsys, "compare", simclr, str(tmp_path / "nope.toml"), "--epochs", "1",
                     "--out", str(out))
    assert code == 2 and "nope.toml' does not exist" in err
    code, err = fail(capsys, "compare", simclr, str(RECIPES / "supervised_digits.toml"),
                     "--epochs", "1", "--out", str(out))
    assert code == 2 and "supervised_digits.toml: objectives: compare measures self-supervised" \
        in err and "cross_entropy trains on labels" in err
    code, err = fail(capsys, "compare", simclr, simclr, "--epochs", "1", "--out", str(out))
    assert code == 2 and "both named 'simclr_digits'" in err
    code, err = fail(capsys, "compare", simclr, "--epochs", "1", "--out", str(out),
                     "--set", "data.split_seed=1", "--set", "objectives[0].temperature=-1")
    assert code == 2 and "objectives[0]" in err and "temperature" in err
    other = tmp_path / "other_split.toml"
    other.write_text((RECIPES / "vicreg_digits.toml").read_text().replace(
        'name = "digits"', 'name = "digits"\nsplit_seed = 1', 1))
    code, err = fail(capsys, "compare", simclr, str(other), "--epochs", "1", "--out", str(out))
    assert code == 2 and "data: compared recipes must share dataset and split" in err
    code, err = fail(capsys, "compare", simclr, "--epochs", "0", "--out", str(out))
    assert code == 2 and "--epochs must be >= 1, got 0" in err
    assert not out.exists()  # nothing was trained or written
