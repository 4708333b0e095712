"""Staged recipes (sdk.stages) and the [data] keys that shape the training split."""

import copy
import json
import re

import pytest
import torch

from sdk import checkpoint, data, stages
from sdk.cli_run import build as cli_run_build
from sdk.config import load_recipe, structure, unstructure
from sdk.errors import ConfigError
from sdk.runs import load_run
from sdk.sweep import points

BACKBONE = {"name": "mlp", "hidden_dims": [32], "out_dim": 16}
RECIPE = {
    "name": "staged",
    "data": {"name": "digits", "batch_size": 64},
    "encoder": {"name": "projection_head", "hidden_dim": 16, "out_dim": 8, "backbone": BACKBONE},
    "optimizer": {"name": "adamw", "lr": 1e-2},
    "evaluation": {"random_init": False, "linear_probe": False},
    "stages": [
        {"name": "pretrain", "data": {"augment": {"noise": 0.1, "mask": 0.2}},
         "objectives": [{"name": "nt_xent"}], "trainer": {"max_steps": 3}},
        {"name": "finetune", "init_keys": ["backbone"], "freeze": ["backbone"],
         "encoder": {"name": "projection_head", "hidden_dim": 16, "out_dim": 10,
                     "backbone": BACKBONE},
         "data": {"label_fraction": 0.2}, "objectives": [{"name": "cross_entropy"}],
         "trainer": {"max_steps": 4}, "calibrator": {"name": "temperature_scaling"}},
        {"name": "evaluate", "train": False, "objectives": [{"name": "cross_entropy"}],
         "encoder": {"name": "projection_head", "hidden_dim": 16, "out_dim": 10,
                     "backbone": BACKBONE}},
    ],
}


def recipe(**changes):
    data_ = copy.deepcopy(RECIPE)
    for path, value in changes.items():
        node = data_
        *head, last = path.split("__")
        for key in head:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return data_


def test_a_stage_is_the_top_level_with_its_keys_laid_over_it():
    top = {"data": {"name": "digits", "batch_size": 64}, "encoder": {"name": "mlp"},
           "objectives": [{"name": "nt_xent"}], "trainer": {"max_epochs": 5, "log_every": 7}}
    stage = {"name": "s", "freeze": ["x"], "data": {"label_fraction": 0.1},
             "objectives": [{"name": "cross_entropy"}], "trainer": {"max_epochs": 2}}
    body = stages.merged(top, stage)
    assert body["data"] == {"name": "digits", "batch_size": 64, "label_fraction": 0.1}
    assert body["objectives"] == [{"name": "cross_entropy"}]  # arrays replace
    assert body["trainer"] == {"max_epochs": 2, "log_every": 7}  # config tables update
    assert body["encoder"] == {"name": "mlp"} and "freeze" not in body and "name" not in body
    assert top["trainer"] == {"max_epochs": 5, "log_every": 7}  # the top level is untouched


@pytest.mark.parametrize("changes, message", [
    ({"stages__1__freeze": ["head2"]}, "stages[1].freeze[0]: 'head2' names no parameter"),
    ({"stages__1__init_keys": ["nope"]}, "stages[1].init_keys[0]: 'nope' names no parameter"),
    ({"stages__1__init": "later"}, "stages[1].init: expected \"previous\", \"none\" or the name"),
    ({"stages__2__name": "pretrain"}, "stages[2].name: 'pretrain' is the name of stages[0] too"),
    ({"stages__1__trainer": {"max_steps": -1}}, "stages[1].trainer.max_steps: must be >= 1"),
    ({"stages__1__objectives": [{"name": "xent"}]}, "stages[1].objectives[0].name: no objective"),
    ({"stages__1__frozen": ["x"]}, "stages[1].frozen: unknown key (did you mean 'freeze'?)"),
    ({"stages__0__init_keys": ["backbone"]}, "stages[0].init_keys: the stage starts from a fresh"),
    ({"stages__1__freeze": ["backbone", "head"]}, "stages[1].freeze: leaves nothing to train"),
    ({"stages__2__objectives": []}, "stages[2].objectives: required key is missing"),
    ({"stages": []}, "stages: give at least one"),
    ({"data": {"batch_size": 0}}, "data.batch_size: must be >= 1, got 0 (in stage 'pretrain')"),
])
def test_a_bad_stage_is_refused_before_anything_trains(tmp_path, changes, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        stages.check(structure(recipe(**changes)))


def test_stages_chain_initialise_freeze_evaluate_and_resume(tmp_path):
    staged = structure(recipe())
    assert load_recipe(RECIPE).stages[1].options.freeze == ["backbone"]
    summary = stages.run_stages(staged, run_dir=tmp_path)
    pre, fine = (checkpoint.load(tmp_path / s / stages.ENCODER) for s in ("pretrain", "finetune"))
    backbone = [k for k in fine if k.startswith("backbone.")]
    assert backbone and all(torch.equal(pre[k], fine[k]) for k in backbone if "running" not in k
                            and "num_batches" not in k)  # copied, then frozen
    head = [k for k in fine if k.startswith("head.") and k.endswith("weight")]
    assert any(pre[k].shape != fine[k].shape for k in head)  # a new 10-class head
    assert summary["finetune/init_from"] == "pretrain" and summary["finetune/frozen_parameters"] > 0
    assert summary["finetune/n_train"] < summary["pretrain/n_train"]  # label_fraction 0.2
    assert summary["evaluate/accuracy"] == summary["finetune/accuracy"]  # same weights, no training
    assert summary["accuracy"] == summary["evaluate/accuracy"] and "knn_accuracy" not in summary
    assert summary["stages"] == ["pretrain", "finetune", "evaluate"]
    assert not (tmp_path / "evaluate" / "checkpoints").exists()
    run = load_run(tmp_path / "evaluate")  # its encoder.pt stands in for a checkpoint
    assert all(torch.equal(v, fine[k]) for k, v in run.encoder.state_dict().items())
    with pytest.raises(ConfigError, match="the directory of a staged recipe"):
        load_run(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary

    again = load_recipe(tmp_path / "config.toml")  # the written recipe gives the same stages
    assert [unstructure(s.recipe) for s in again.stages] == [unstructure(s.recipe)
                                                            for s in staged.stages]

    stamp = (tmp_path / "pretrain" / stages.ENCODER).stat().st_mtime_ns
    (tmp_path / "finetune" / stages.ENCODER).unlink()  # finetune stopped after its last checkpoint
    resumed = stages.run_stages(again, run_dir=tmp_path, resume=True)
    assert (tmp_path / "pretrain" / stages.ENCODER).stat().st_mtime_ns == stamp  # not rerun
    after = checkpoint.load(tmp_path / "finetune" / stages.ENCODER)
    assert all(torch.equal(after[k], fine[k]) for k in fine)
    assert resumed["finetune/train/steps"] == 4 and resumed["accuracy"] == summary["accuracy"]


def test_a_sweep_reaches_into_stages():
    swept = points(recipe(sweep={"stages[0].train": [True, False],
                                 "stages[1].data.label_fraction": [0.1, 0.5]}))
    assert [(p.recipe.stages[0].options.train, p.recipe.stages[1].recipe.data.label_fraction)
            for p in swept] == [(True, 0.1), (True, 0.5), (False, 0.1), (False, 0.5)]


def test_long_tailed_label_subset_and_noise():
    y = torch.arange(10).repeat_interleave(100)
    kept = data.long_tailed(y, 50.0, seed=1)
    counts = torch.bincount(y[kept], minlength=10)
    assert counts[0] == 100 and counts[-1] == 2 and torch.all(counts[:-1] >= counts[1:])
    assert counts[5].item() == round(100 * 50 ** (-5 / 9))
    first, second = data.label_subset(y, 0.7, 0.0, seed=3), data.label_subset(y, 0.1, 0.7, seed=3)
    assert len(first) == 700 and len(second) == 100 and not set(first.tolist()) & set(second.tolist())
    assert torch.equal(torch.bincount(y[second]), torch.full((10,), 10))
    with pytest.raises(ConfigError, match="label_start \\+ label_fraction must be <= 1"):
        data.label_subset(y, 0.5, 0.6)
    noisy = data.flip_labels(y, 0.3, 10, seed=0)
    changed = noisy != y
    assert abs(changed.float().mean().item() - 0.3) < 0.04  # every flip is to another class
    assert torch.bincount(noisy[changed], minlength=10).min() > 0


def test_reshape_training_keeps_indices_and_noises_only_the_named_splits():
    splits = data.load("digits")
    out = data.reshape_training(splits, label_noise=0.4, noise_splits=["train", "test"],
                                label_fraction=0.5, seed=0)
    assert torch.equal(out.calibration.y, splits.calibration.y)
    assert (out.test.y != splits.test.y).float().mean() > 0.3
    position = {int(i): k for k, i in enumerate(splits.train.index)}
    rows = torch.tensor([position[int(i)] for i in out.train.index])
    assert torch.equal(out.train.x, splits.train.x[rows])  # samples keep their dataset index
    assert abs(len(out.train) - len(splits.train) / 2) <= 10
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        data.reshape_training(splits, label_noise=0.1, noise_splits=["val"])


def test_the_left_out_training_samples_are_the_unlabelled_stream(tmp_path, monkeypatch):
    from sdk import cli_run
    from sdk.cli_run import load_splits, prepare, run_recipe

    supervised = {"name": "semisup", "data": {"name": "digits", "batch_size": 32,
                                              "label_fraction": 0.2, "unlabeled": True,
                                              "unlabeled_batch_size": 64},
                  "encoder": {"name": "mlp", "hidden_dims": [32], "out_dim": 10},
                  "objectives": [{"name": "cross_entropy"}],
                  "callbacks": [{"name": "self_training", "threshold": 0.0, "refresh_every": 2}],
                  "trainer": {"max_steps": 5}}
    recipe_ = load_recipe(supervised)
    splits = load_splits(recipe_.data)
    assert len(splits.train) + len(splits.unlabeled) == len(data.load("digits").train)
    assert torch.equal(splits.unlabeled.index, torch.arange(len(splits.unlabeled)))
    built = []
    monkeypatch.setattr(cli_run, "build", lambda *a: built.append(cli_run_build(*a)) or built[-1])
    run_recipe(recipe_, run_dir=tmp_path)
    callback = built[0]["callbacks"][0]
    assert callback.labels is not None and callback.labels.numel() == len(splits.unlabeled)
    assert (callback.labels >= 0).sum() > 0  # rounds of pseudo-labels over the left-out samples
    with pytest.raises(ConfigError, match="^data.unlabeled: 'self_training' learns from"):
        prepare(load_recipe(supervised, ["data.unlabeled=false"]))
    with pytest.raises(ConfigError, match="^data.unlabeled: nothing in the recipe reads"):
        prepare(load_recipe(supervised, ["callbacks=[]"]))
    with pytest.raises(ConfigError, match="^data.unlabeled: imbalance_ratio and label_fraction"):
        prepare(load_recipe(supervised, ["data.label_fraction=1.0"]))
