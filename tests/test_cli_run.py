"""``paperplug run`` / ``paperplug demo`` end to end: files, summary keys, overrides, resume."""

from __future__ import annotations

import json
import re
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


def fail(capsys, *argv: str) -> tuple[int, str]:
    """The exit status and the one line on stderr of a command that fails."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    return code, captured.err


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


@pytest.mark.parametrize("recipe", ["supervised_digits", "simclr_digits"])
def test_a_calibrator_of_features_is_fitted_and_applied_on_the_representation(recipe, tmp_path,
                                                                              capsys):
    """RCAL takes features: the run fits it on the held-out split's representation (the
    encoder's features; the probe's input in a self-supervised recipe) and the loaded run
    predicts through the same path (a calibrator fed logits instead would see 10 columns)."""
    import torch

    from sdk.runs import load_run

    code, out = run(capsys, "run", str(RECIPES / f"{recipe}.toml"), "--run-dir", str(tmp_path),
                    "--set", "trainer.max_steps=3", "--set",
                    "calibrator.name=rcal_gaussian_feature_sampling",
                    "--set", "calibrator.samples_per_class=20")
    assert code == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    trained = load_run(tmp_path)
    from sdk.cli_run import load_splits

    test = load_splits(trained.recipe.data).test
    probs = trained.predict_proba(test.x)
    accuracy = float((probs.argmax(-1) == test.y).float().mean())
    assert accuracy == pytest.approx(summary["calibrated_accuracy"], abs=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(len(test.y), dtype=probs.dtype), atol=1e-5)


@pytest.mark.parametrize(("calibrator", "why"), [
    ("split_point_uq", "takes 'regression' scores"),
    ("domain_specific_heads", r"needs \['domains'\] at fit time")])
def test_a_calibrator_a_recipe_cannot_fit_is_refused_before_training(calibrator, why, tmp_path,
                                                                     capsys):
    code, err = fail(capsys, "run", str(RECIPES / "supervised_digits.toml"), "--run-dir",
                     str(tmp_path), "--set", f"calibrator.name={calibrator}")
    assert code == 2
    assert re.search(rf"calibrator: calibrator '{calibrator}' {why}", err), err
    assert not (tmp_path / "checkpoints").exists()


def test_overrides_are_type_checked(tmp_path, capsys):
    code, out = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"), "--run-dir",
                     str(tmp_path), "--set", "objectives[0].temperature=\"hot\"")
    assert code == 2
    assert 'objectives[0].temperature: expected float, got "hot"' in out
    code, out = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                     "--set", "trainer.max_epochs=many")
    assert code == 2 and 'trainer.max_epochs: expected int, got "many"' in out
    # brackets in messages are text, not console markup; a message is one line
    code, out = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"),
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
    code, out = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                     "--set", "trainer.max_epoch=3")
    assert code == 2 and "trainer.max_epoch: unknown key; did you mean 'max_epochs'?" in out
    code, out = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"),
                     "--set", "trainer.log_every=0")
    assert code == 2 and "trainer.log_every: must be >= 1, got 0" in out


def test_run_needs_a_recipe_or_resume(capsys):
    code, out = fail(capsys, "run")
    assert code == 2 and "give a RECIPE or --resume DIR" in out


def test_demo_prints_results(tmp_path, capsys):
    code, out = run(capsys, "demo", "--run-dir", str(tmp_path), "--set", "trainer.max_steps=2",
                    "--set", "evaluation.linear_probe=false")
    assert code == 0, out
    assert "paperplug demo" in out and "simclr_digits" in out
    assert "kNN accuracy (test): " in out and "kNN accuracy, random-init encoder: " in out
    assert "linear-probe" not in out
    assert (tmp_path / "summary.json").exists()


# exit status and one-line errors, as a shell sees them -------------------------------------------

EXPLODING = """
import sys
from plugins.classification.cross_entropy import CrossEntropy
from sdk import registry
from sdk.card import Card


class Exploding(CrossEntropy):
    def forward(self, views, batch):
        raise RuntimeError("exploded at the first step\\n(second line of the message)")


registry.get_registry().add(Exploding, card=Card(
    name="exploding", kind="objective", title="Exploding", summary="Raises in training."))
from sdk.cli import main
sys.exit(main(sys.argv[1:]))
"""


def shell(*argv: str, script: str | None = None, env: dict | None = None,
          cwd: Path | None = None):
    """``python -m sdk.cli ARGV`` (or ``python -c SCRIPT ARGV``) in a fresh interpreter."""
    import os
    import subprocess
    import sys

    root = RECIPES.parents[1]
    command = [sys.executable, *(["-c", script] if script else ["-m", "sdk.cli"]), *argv]
    environ = {**os.environ, "PYTHONPATH": str(root), "CI": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd=cwd or root,
                          timeout=300)


def one_line(done) -> str:
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("paperplug: error: ")
    return done.stderr


BAD_USAGE = [
    (("run", "RECIPE", "--bogus"), "unrecognized arguments: --bogus (see paperplug --help)"),
    (("run", "RECIPE", "--set"), "argument --set: expected one argument"),
    (("run", "RECIPE", "--set", "trainer.max_epochs"), "--set expects key=value"),
    (("run", "RECIPE", "--set", "trainer.max_epoch=3"),
     "trainer.max_epoch: unknown key; did you mean 'max_epochs'?"),
    (("run", "RECIPE", "--set", "optimizer.lr=-1"), "optimizer.lr: AdamW rejects it"),
    (("run", "BAD"), 'objectives[0].temperature: expected float, got "hot"'),
    (("run", "MISSING"), "missing.toml' does not exist"),
    (("run",), "give a RECIPE or --resume DIR"),
    (("plugins", "show", "nt_xnet"), "no plugin named 'nt_xnet'. Did you mean 'nt_xent'?"),
    (("plugins", "list", "--kind", "objectiv"), "Did you mean 'objective'?"),
    (("bogus",), "invalid choice: 'bogus'"),
    ((), "the following arguments are required: command"),
]
IN_A_SHELL = {0, 2, 3, 5, 8, 11}  # the others are checked in-process only (each shell takes seconds)


@pytest.mark.parametrize("case", range(len(BAD_USAGE)))
def test_bad_recipes_and_bad_usage_exit_2_with_one_line(case, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text((RECIPES / "simclr_digits.toml").read_text().replace("temperature = 0.2",
                                                                        'temperature = "hot"'))
    names = {"RECIPE": str(RECIPES / "simclr_digits.toml"), "BAD": str(bad),
             "MISSING": str(tmp_path / "missing.toml")}
    words, message = BAD_USAGE[case]
    argv = [names.get(w, w) for w in words]
    if argv[:1] == ["run"]:
        argv += ["--run-dir", str(tmp_path / "run")]
    code, err = fail(capsys, *argv)
    assert code == 2 and err.startswith("paperplug: error: ") and message in err, err
    if case in IN_A_SHELL:
        done = shell(*argv)
        assert done.returncode == 2 and message in one_line(done), done.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_exits_1_with_one_line_and_the_traceback_on_request(tmp_path):
    recipe = tmp_path / "exploding.toml"
    recipe.write_text((RECIPES / "supervised_digits.toml").read_text().replace(
        'name = "cross_entropy"', 'name = "exploding"'))
    argv = ("run", str(recipe), "--run-dir", str(tmp_path / "run"), "--set", "trainer.max_steps=1")
    done = shell(*argv, script=EXPLODING)
    assert done.returncode == 1, done
    assert one_line(done) == ("paperplug: error: PluginFailure: objective 'exploding' failed in "
                              "forward(): RuntimeError: exploded at the first step "
                              "(second line of the message)\n")
    for debug in ({"env": {"PAPERPLUG_DEBUG": "1"}}, {}):
        done = shell(*(argv if debug else ("--debug", *argv)), script=EXPLODING, **debug)
        assert done.returncode == 1
        assert done.stderr.startswith("Traceback (most recent call last):")
        assert "in forward" in done.stderr and done.stderr.rstrip().endswith(
            "(second line of the message)")
    done = shell("run", str(RECIPES / "simclr_digits.toml"), "--debug", "--set", "x.y=1")
    assert done.returncode == 2 and "Traceback" in done.stderr  # --debug after the subcommand


def test_main_returns_the_exit_status(capsys, monkeypatch):
    import sdk.cli_run

    def boom(*args, **kwargs):
        raise ValueError("a failure during training")

    monkeypatch.setattr(sdk.cli_run, "run_recipe", boom)
    code, err = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"))
    assert code == 1 and err == "paperplug: error: ValueError: a failure during training\n"
    code, err = fail(capsys, "run", str(RECIPES / "simclr_digits.toml"), "--set", "seed=x")
    assert code == 2 and err == 'paperplug: error: seed: expected int, got "x"\n'
    code, err = fail(capsys, "plugins", "show", "mixupp")
    assert code == 2 and "Did you mean 'mixup'?" in err
