"""``sdk.load_run`` and ``paperplug export``: the trained model of a run directory, measured
again from what was loaded, and exported encoders that give the same embeddings."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

import sdk
from sdk import checkpoint as ckpt
from sdk import metrics
from sdk.cli import main
from sdk.cli_run import build, load_splits

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    monkeypatch.setenv("CI", "1")


def _train(tmp_path_factory, recipe: str) -> Path:
    run_dir = tmp_path_factory.mktemp(recipe)
    assert main(["run", str(RECIPES / f"{recipe}.toml"), "--run-dir", str(run_dir),
                 "--set", "trainer.max_steps=4"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    return _train(tmp_path_factory, "supervised_digits")


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
    return _train(tmp_path_factory, "simclr_digits")


def test_a_supervised_run_loads_and_measures_as_it_did(supervised_run):
    run = sdk.load_run(supervised_run)
    summary = json.loads((supervised_run / "summary.json").read_text())
    assert run.step == summary["train/steps"] == 4 and run.supervised
    assert not run.encoder.training and run.calibrator is not None
    test = load_splits(run.recipe.data).test
    logits = run.logits(test.x)
    assert metrics.accuracy(logits.softmax(-1), test.y) == pytest.approx(summary["accuracy"])
    proba = run.predict_proba(test.x)
    assert metrics.ece(proba, test.y) == pytest.approx(summary["ece_after"], abs=1e-6)
    assert metrics.ece(logits.softmax(-1), test.y) == pytest.approx(summary["ece_before"], abs=1e-6)
    # the weights are the checkpoint's, not a fresh initialisation
    fresh = build(run.recipe, load_splits(run.recipe.data))["encoder"].eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(test.x), logits)


def test_a_self_supervised_run_keeps_its_probe_and_calibrator(ssl_run):
    run = sdk.load_run(ssl_run)
    summary = json.loads((ssl_run / "summary.json").read_text())
    assert not run.supervised and run.probe is not None and run.calibrator is not None
    test = load_splits(run.recipe.data).test
    logits = run.logits(test.x)
    assert metrics.accuracy(logits, test.y) == pytest.approx(summary["linear_probe_accuracy"])
    assert metrics.ece(run.predict_proba(test.x), test.y) == pytest.approx(summary["ece_after"],
                                                                           abs=1e-6)
    assert run.features  # the recipe evaluates the backbone's features, before the head
    with torch.no_grad():
        torch.testing.assert_close(run.embed(test.x[:5]), run.encoder.features(test.x[:5]))
    assert run.embed(test.x[:5], features=False).shape == (5, run.encoder.out_dim)


def test_the_features_export_is_the_backbone(ssl_run, tmp_path):
    out = sdk.runs.export(ssl_run, "torchscript", tmp_path / "features.ts.pt", features=True)
    run = sdk.load_run(ssl_run)
    x = load_splits(run.recipe.data).test.x[:32]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.testing.assert_close(torch.jit.load(str(out))(x), run.encoder.features(x),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(sdk.ConfigError, match="features=True applies to torchscript and onnx"):
        sdk.runs.export(run, "state_dict", tmp_path / "x.pt", features=True)


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_exported_encoders_give_the_same_embeddings(ssl_run, fmt, tmp_path, capsys):
    out = tmp_path / f"encoder.{fmt}"
    assert main(["export", str(ssl_run), "--format", fmt, "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    run = sdk.load_run(ssl_run)
    x = load_splits(run.recipe.data).test.x[:64]  # more rows than the trace saw
    with torch.no_grad():
        expected = run.encoder(x)
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                got = torch.jit.load(str(out))(x)
        else:
            state = torch.load(out, weights_only=True)
            model = build(run.recipe, load_splits(run.recipe.data))["encoder"]
            model.load_state_dict(state)
            got = model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_onnx_needs_its_package(ssl_run, tmp_path, capsys):
    out = tmp_path / "encoder.onnx"
    status = main(["export", str(ssl_run), "--format", "onnx", "--output", str(out)])
    if importlib.util.find_spec("onnx") is not None:
        assert status == 0 and out.stat().st_size > 0
    else:
        err = capsys.readouterr().err
        assert status == 2 and "'onnx' package" in err and "not installed" in err
        assert not out.exists()


def test_what_is_not_a_usable_run_is_named(ssl_run, tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "has no config.toml" in capsys.readouterr().err
    with pytest.raises(sdk.ConfigError, match="format must be one of"):
        sdk.runs.export(ssl_run, "pickle")
    # a damaged newest checkpoint: the previous one is loaded, with a warning
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.toml", "inference.pt"):
        (copy / name).write_bytes((ssl_run / name).read_bytes())
    newest = ckpt.checkpoint_files(ssl_run / "checkpoints")[0]
    state = ckpt.load(newest)
    older = dict(state, position={**state["position"], "step": 2})
    ckpt.save(older, copy / "checkpoints" / ckpt.checkpoint_name(2))
    (copy / "checkpoints" / newest.name).write_bytes(newest.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = sdk.load_run(copy)
    assert run.step == 2 and any("truncated" in str(w.message) for w in caught)
    # a checkpoint of another model
    wrong = dict(state, components={**state["components"],
                                    "encoder": {"net.0.weight": torch.zeros(3, 3)}})
    ckpt.save(wrong, copy / "checkpoints" / ckpt.checkpoint_name(9))
    with pytest.raises(sdk.errors.CheckpointError, match="does not fit the encoder"):
        sdk.load_run(copy)
