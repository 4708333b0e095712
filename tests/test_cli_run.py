"""``paperplug run`` / ``paperplug demo`` end to end: files, summary keys, overrides, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdk.cli import main
from sdk.config import load_recipe, tomllib

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
SSL_KEYS = {"knn_accuracy", "linear_probe_accuracy", "random_init_knn_accuracy",
            "random_init_linear_probe_accuracy", "ece_before", "ece_after", "nll_before",
            "nll_after"}
SUPERVISED_KEYS = {"accuracy", "ece_before", "ece_after", "nll_before", "nll_after"}


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    monkeypatch.setenv("CI", "1")


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("recipe", "keys"), [("simclr_digits", SSL_KEYS),
                                              ("barlow_twins_digits", SSL_KEYS),
                                              ("supervised_digits", SUPERVISED_KEYS)])
def test_recipe_runs_end_to_end(recipe, keys, tmp_path, capsys):
    code, out = run(capsys, "run", str(RECIPES / f"{recipe}.toml"), "--run-dir", str(tmp_path),
                    "--set", "trainer.max_steps=3")
    assert code == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert keys <= set(summary)
    assert summary["train/steps"] == 3
    assert summary["n_train"] + summary["n_calibration"] + summary["n_test"] == 1797
    for key in keys:
        assert 0 <= summary[key] < (10 if key.startswith("nll") else 1.0 + 1e-9), key
    # the resolved recipe (with the override) is written and reads back
    assert load_recipe(tmp_path / "config.toml").trainer.max_steps == 3
    records = lines(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]
    for png in ("training_curves.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003.pt"]
    # plain result lines, not a table, when CI is set
    assert "ECE after calibration: " in out and "┃" not in out


def test_overrides_are_type_checked(tmp_path, capsys):
    code, out = run(capsys, "run", str(RECIPES / "simclr_digits.toml"), "--run-dir",
                    str(tmp_path), "--set", "objectives[0].temperature=\"hot\"")
    assert code == 2
    assert 'objectives[0].temperature: expected float, got "hot"' in out
    code, out = run(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                    "--set", "trainer.max_epochs=many")
    assert code == 2 and 'trainer.max_epochs: expected int, got "many"' in out
    # brackets in messages are text, not console markup; a message is one line
    code, out = run(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                    "--set", 'encoder.backbone.hidden_dims="wide"')
    assert code == 2
    assert 'encoder.backbone.hidden_dims: expected tuple[int, ...] | list[int], got "wide"' in out


def test_resume_continues_to_the_same_result(tmp_path, capsys):
    """A 2-epoch run equals a 1-epoch run resumed for a second epoch. The straight run also
    checks that temperature scaling fitted on the calibration split lowers test NLL and ECE,
    and that the last epoch's validation accuracy (clean inputs, eval mode) agrees with the
    held-out test accuracy of the same model."""
    recipe = str(RECIPES / "supervised_digits.toml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(capsys, "run", recipe, "--run-dir", str(straight),
               "--set", "trainer.max_epochs=2")[0] == 0
    assert run(capsys, "run", recipe, "--run-dir", str(split),
               "--set", "trainer.max_epochs=1")[0] == 0
    code, out = run(capsys, "run", "--resume", str(split), "--set", "trainer.max_epochs=2")
    assert code == 0, out
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((split / "summary.json").read_text())
    assert b["train/steps"] == a["train/steps"] and b["train/epochs"] == 2
    assert b["accuracy"] == a["accuracy"] and b["nll_after"] == pytest.approx(a["nll_after"])
    epochs_a = [r for r in lines(straight / "metrics.jsonl") if r["kind"] == "epoch"]
    epochs_b = [r for r in lines(split / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs_b] == [0, 1]
    assert [r["loss"] for r in epochs_b] == pytest.approx([r["loss"] for r in epochs_a], rel=1e-6)
    assert tomllib.loads((split / "config.toml").read_text())["trainer"]["max_epochs"] == 2

    assert a["nll_after"] < a["nll_before"] and a["ece_after"] < a["ece_before"]
    assert abs(epochs_a[-1]["val/accuracy"] - a["accuracy"]) < 0.06


def test_trainer_settings_are_listed_and_checked_by_the_cli(capsys):
    import attrs

    from sdk.config import TrainerConfig

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for field in attrs.fields(TrainerConfig):
        assert f"trainer.{field.name} " in out and field.metadata["doc"] in out, field.name
    code, out = run(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                    "--set", "trainer.max_epoch=3")
    assert code == 2 and "trainer.max_epoch: unknown key; did you mean 'max_epochs'?" in out
    code, out = run(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                    "--set", "trainer.log_every=0")
    assert code == 2 and "trainer.log_every: must be >= 1, got 0" in out


def test_run_needs_a_recipe_or_resume(capsys):
    code, out = run(capsys, "run")
    assert code == 2 and "give a RECIPE or --resume DIR" in out


def test_demo_prints_results(tmp_path, capsys):
    code, out = run(capsys, "demo", "--run-dir", str(tmp_path), "--set", "trainer.max_steps=2",
                    "--set", "evaluation.linear_probe=false")
    assert code == 0, out
    assert "paperplug demo" in out and "simclr_digits" in out
    assert "kNN accuracy (test): " in out and "kNN accuracy, random-init encoder: " in out
    assert "linear-probe" not in out
    assert (tmp_path / "summary.json").exists()
