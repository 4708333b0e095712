"""Composition checks: what a Sampler, Teacher or Transform produces must be consumed by the
objective, at build time (sdk.create, the objective algebra, the Trainer, recipes)."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import sdk
from sdk import compose
from sdk.cli_run import build
from sdk.config import load_recipe, tomllib
from sdk.data import GaussianNoise
from sdk.interfaces import Input, Objective, Sampler, Teacher

SGD = functools.partial(torch.optim.SGD, lr=0.1)
RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


def sampler(name, **params):
    return sdk.create("sampler", name, **params)


def trainer(objective, **kwargs):
    return sdk.Trainer(nn.Linear(4, 3), objective, SGD, max_steps=1, progress=False, device="cpu",
                       **kwargs)


@pytest.mark.parametrize("objective, producer, ignored", [
    ("cacr", "hard_negative_mixing", "extra_negatives"),
    ("groco", "hard_negative_mixing", "extra_negatives"),
    ("adaptive_multihead_contrastive", "hard_negative_mixing", "extra_negatives"),
    ("groco", "meow_weighted_negatives", "pair_weights"),
    ("adaptive_multihead_contrastive", "meow_weighted_negatives", "pair_weights"),
])
def test_create_rejects_an_objective_that_would_ignore_what_its_sampler_produces(
        objective, producer, ignored):
    with pytest.raises(sdk.ConfigError) as info:
        sdk.create("objective", objective, sampler=sampler(producer))
    message = str(info.value)
    assert f"objective {objective!r}" in message
    assert f"sampler {producer!r}" in message
    assert f"ignores the {ignored}" in message


@pytest.mark.parametrize("objective, producer", [
    ("nt_xent", "hard_negative_mixing"), ("decoupled_contrastive", "hard_negative_mixing"),
    ("isogclr", "meow_weighted_negatives"), ("cacr", "meow_weighted_negatives"),
    ("cacr", "label_positives"), ("groco", "label_positives"),
    ("adaptive_multihead_contrastive", "same_index"),
    ("scat_simclr_pretext", "hard_negative_mixing"),
])
def test_compositions_whose_inputs_are_all_consumed_are_accepted(objective, producer):
    built = sdk.create("objective", objective, sampler=sampler(producer))
    inner = [m for m in built.modules() if getattr(m, "sampler", None) is not None]
    assert inner and all(m.sampler.produces <= m.consumes for m in inner)


def test_the_objective_algebra_checks_terms_built_directly():
    from plugins.contrastive.cacr import CACR
    from plugins.contrastive.hard_negative_mixing import HardNegativeMixing

    term = CACR(sampler=HardNegativeMixing())  # no sdk.create: not checked yet
    with pytest.raises(sdk.ConfigError, match="objective 'cacr'.*sampler 'hard_negative_mixing'"):
        0.5 * term + sdk.create("objective", "nt_xent")


def test_a_weighted_sum_consumes_what_any_term_consumes():
    total = sdk.create("objective", "barlow_twins") + 0.5 * sdk.create("objective", "groco")
    assert total.consumes == {Input.PAIRS}
    assert total.batch_coupled
    assert not (2 * sdk.create("objective", "cross_entropy")).batch_coupled


def test_the_trainer_rejects_a_pair_sampler_no_term_fully_consumes_and_leaves_the_term_alone():
    objective = sdk.create("objective", "cacr")
    with pytest.raises(sdk.ConfigError, match="objective 'cacr' ignores the extra_negatives "
                                              "that sampler 'hard_negative_mixing'"):
        trainer(objective, sampler=sampler("hard_negative_mixing"), transforms=GaussianNoise(0.1))
    assert objective.sampler is None
    trainer(objective, sampler=sampler("label_positives"), transforms=GaussianNoise(0.1))
    assert objective.sampler is not None


def test_the_trainer_checks_samplers_set_on_terms_directly():
    objective = sdk.create("objective", "groco")
    objective.sampler = sampler("meow_weighted_negatives")
    with pytest.raises(sdk.ConfigError, match="objective 'groco' ignores the pair_weights"):
        trainer(objective, transforms=GaussianNoise(0.1))


@pytest.mark.parametrize("teacher", ["queue", "memory_bank"])
def test_the_trainer_rejects_a_teacher_whose_negatives_no_term_consumes(teacher):
    params = {"size": 16} if teacher == "queue" else {"num_samples": 16}
    with pytest.raises(sdk.ConfigError) as info:
        trainer(sdk.create("objective", "barlow_twins") + sdk.create("objective", "cacr"),
                teacher=sdk.create("teacher", teacher, **params), transforms=GaussianNoise(0.1))
    message = str(info.value)
    assert "'barlow_twins' + 'cacr'" in message and f"teacher {teacher!r}" in message
    assert "extra_negatives" in message
    # one term that consumes them is enough
    trainer(sdk.create("objective", "barlow_twins") + sdk.create("objective", "nt_xent"),
            teacher=sdk.create("teacher", teacher, **params), transforms=GaussianNoise(0.1))


def test_the_trainer_rejects_mixup_for_an_objective_that_needs_class_ids():
    mixup = sdk.create("transform", "mixup", num_classes=3)
    with pytest.raises(sdk.ConfigError, match="objective 'core_tuning' ignores the soft_labels "
                                              "that transform 'mixup'"):
        trainer(sdk.create("objective", "core_tuning"), transforms=sdk.data.Compose([mixup]))


def test_mixup_with_label_smoothing_warns_once(monkeypatch):
    monkeypatch.setattr(compose, "_WARNED", set())

    def build_it():
        return trainer(sdk.create("objective", "cross_entropy", label_smoothing=0.1),
                       transforms=sdk.create("transform", "mixup", num_classes=3))

    with pytest.warns(UserWarning, match="objective 'cross_entropy' with transform 'mixup' "
                                         r"\(soft_labels\): label_smoothing=0.1"):
        build_it()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_it()  # the same pair of plugins again: no second warning
        trainer(sdk.create("objective", "cross_entropy"),
                transforms=sdk.create("transform", "mixup", num_classes=3))  # no smoothing


def test_a_recipe_with_an_ignored_input_fails_to_build():
    d = tomllib.loads((RECIPES / "simclr_digits.toml").read_text())
    bad = copy.deepcopy(d)
    bad["objectives"] = [{"name": "cacr", "sampler": {"name": "hard_negative_mixing"}}]
    with pytest.raises(sdk.ConfigError, match=r"objectives\[0\]: objective 'cacr' ignores the "
                                              "extra_negatives that sampler 'hard_negative_mixing'"):
        build(load_recipe(bad), sdk.data.load("digits"))
    good = copy.deepcopy(d)
    good["objectives"] = [{"name": "nt_xent", "sampler": {"name": "hard_negative_mixing"}}]
    build(load_recipe(good), sdk.data.load("digits"))


def test_a_recipe_whose_teacher_negatives_no_term_consumes_fails_before_training(tmp_path):
    from sdk.cli_run import run_recipe

    d = tomllib.loads((RECIPES / "simclr_digits.toml").read_text())
    d["objectives"] = [{"name": "barlow_twins"}]
    d["teacher"] = {"name": "queue", "size": 64}
    with pytest.raises(sdk.ConfigError, match="objective 'barlow_twins' ignores the "
                                              "extra_negatives that teacher 'queue'"):
        run_recipe(load_recipe(d), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_every_builtin_objective_sampler_and_teacher_declares_its_inputs():
    reg = sdk.get_registry()
    for kind, base, attr in (("objective", Objective, "consumes"), ("sampler", Sampler, "produces"),
                             ("teacher", Teacher, "produces")):
        for card in reg.cards(kind):
            cls = reg.get(kind, card.name).factory
            if not issubclass(cls, base):  # data-level samplers feed the DataLoader, not an objective
                continue
            values = getattr(cls, attr)
            assert isinstance(values, frozenset) and all(isinstance(i, Input) for i in values)
            declared = {k for c in cls.__mro__ if c is not base for k in vars(c)}
            assert attr in declared or kind == "objective", f"{kind} {card.name}: declare {attr}"
            if kind == "objective":
                assert isinstance(cls.batch_coupled, bool), f"objective {card.name}: declare batch_coupled"
