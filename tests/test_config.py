"""TOML recipes: structuring, --set overrides, error messages that name the key path."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Annotated

import pytest

import sdk
from sdk import data, sweep
from sdk.card import Card
from sdk.cli_run import build
from sdk.config import (
    ObjectiveSpec,
    PluginSpec,
    apply_override,
    build_optimizer,
    create,
    dump_toml,
    load_recipe,
    parse_path,
    tomllib,
    unstructure,
)
from sdk.context import BuildContext, FromData
from sdk.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
SSL = tomllib.loads((RECIPES / "barlow_twins_digits.toml").read_text())


@pytest.fixture(scope="module")
def splits():
    return data.load("digits")


def recipe_with(mutate):
    d = copy.deepcopy(SSL)
    mutate(d)
    return d


def error_of(source, overrides=(), splits=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        recipe = load_recipe(source, overrides)
        if splits is not None:
            build(recipe, splits)
    return info.value


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_example_recipe_loads_builds_and_round_trips(path, splits):
    swept = sweep.points(path)  # a recipe with a [sweep] table: its first point
    recipe = swept[0].recipe if swept else load_recipe(path)
    for stage in recipe.stages:  # a staged recipe: every stage is built
        assert build(stage.recipe, splits)["objective"] is not None
    if not recipe.stages:
        parts = build(recipe, splits)
        assert parts["objective"] is not None and parts["calibrator"] is not None
    # the resolved recipe written to config.toml reads back to the same recipe
    assert load_recipe(tomllib.loads(dump_toml(unstructure(recipe)))) == recipe


def test_recipe_values_are_structured():
    recipe = load_recipe(RECIPES / "simclr_digits.toml")
    assert recipe.data.augment.shift == 1 and recipe.data.augment.mask == 0.2
    assert recipe.encoder == PluginSpec(name="projection_head",
                                        params={"hidden_dim": 256, "out_dim": 64,
                                                "backbone": PluginSpec(
                                                    name="mlp",
                                                    params={"hidden_dims": [256, 256],
                                                            "out_dim": 16})})
    assert recipe.objectives == [ObjectiveSpec(name="nt_xent", params={"temperature": 0.2})]
    assert recipe.trainer.max_epochs == 300 and recipe.trainer.max_steps is None
    assert recipe.optimizer.lr == 2e-3


def test_ill_typed_plugin_parameter_names_the_objective_index(splits):
    two = recipe_with(lambda d: d.update(objectives=[{"name": "nt_xent"},
                                                     {"name": "barlow_twins", "lambd": "x"}]))
    err = error_of(two, splits=splits)
    assert str(err).startswith('objectives[1].lambd: expected float, got "x"')
    assert err.path == "objectives[1].lambd"


def test_ill_typed_nested_plugin_parameter(splits):
    err = error_of(SSL, ['encoder.backbone.hidden_dims="wide"'], splits=splits)
    assert str(err).startswith('encoder.backbone.hidden_dims: expected ')
    assert 'got "wide"' in str(err)


def test_unknown_plugin_parameter_is_reported_with_path_and_accepted_names(splits):
    err = error_of(SSL, ["objectives[0].lamda=0.1"], splits=splits)
    assert str(err).startswith("objectives[0].lamda: ")
    assert "no parameter 'lamda'" in str(err) and "lambd" in str(err)


def test_unknown_plugin_name_suggests_the_closest(splits):
    err = error_of(SSL, ['objectives[0].name="barlow_twinz"'], splits=splits)
    assert str(err).startswith("objectives[0].name: ")
    assert "Did you mean 'barlow_twins'" in str(err)  # first of the close names
    err = error_of(SSL, ['calibrator.name="temperature_scalin"'], splits=splits)
    assert str(err).startswith("calibrator.name: ") and "'temperature_scaling'" in str(err)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["trainer"].update(max_epochs="x"), 'trainer.max_epochs: expected int, got "x"'),
    (lambda d: d["data"].update(batch_size=True), "data.batch_size: expected int, got true"),
    (lambda d: d["data"]["augment"].update(shift=1.5), "data.augment.shift: expected int, got 1.5"),
    (lambda d: d["optimizer"].update(lr="fast"), 'optimizer.lr: expected float, got "fast"'),
    (lambda d: d.update(trainer=3), "trainer: expected a table, got 3"),
    (lambda d: d.pop("encoder"), "encoder: required key is missing"),
    (lambda d: d["objectives"][0].pop("name"), "objectives[0].name: required key is missing"),
    (lambda d: d["objectives"][0].update(weight="x"),
     'objectives[0].weight: expected a finite number or a schedule table, got "x"'),
    (lambda d: d.update(trainr={}), "trainr: unknown key; did you mean 'trainer'?"),
    (lambda d: d["trainer"].update(max_epoch=3),
     "trainer.max_epoch: unknown key; did you mean 'max_epochs'? accepted: max_epochs, max_steps,"),
    (lambda d: d["trainer"].update(accumulate=0), "trainer.accumulate: must be >= 1, got 0"),
    (lambda d: d["trainer"].update(clip_grad_norm=0), "trainer.clip_grad_norm: must be > 0, got 0.0"),
    (lambda d: d["trainer"].update(precision="16"),
     "trainer.precision: must be one of '32', 'bf16-mixed', 'fp16-mixed', got \"16\""),
    (lambda d: d["data"]["augment"].update(shfit=1),
     "data.augment.shfit: unknown key; did you mean 'shift'?"),
])
def test_recipe_errors_name_the_key_path(mutate, message):
    err = error_of(recipe_with(mutate))
    assert str(err).startswith(message), str(err)
    assert err.path == message.split(":", 1)[0]


def test_several_errors_are_all_reported():
    err = error_of(recipe_with(lambda d: d["trainer"].update(epochs=1, max_steps="2")))
    assert "trainer.epochs: unknown key" in str(err)
    assert 'trainer.max_steps: expected int, got "2"' in str(err)


def test_int_is_accepted_where_a_float_is_expected():
    recipe = load_recipe(SSL, ["optimizer.lr=1"])
    assert recipe.optimizer.lr == 1.0 and isinstance(recipe.optimizer.lr, float)


def test_overrides_are_parsed_as_toml_and_type_checked():
    d = copy.deepcopy(SSL)
    apply_override(d, "trainer.max_epochs=3")
    apply_override(d, "objectives[0].lambd=0.01")
    apply_override(d, "encoder.backbone.hidden_dims=[32, 32]")
    apply_override(d, "name=plain_string")
    apply_override(d, "trainer.clip_grad_norm=1.5")  # a key the file leaves out
    assert d["trainer"]["max_epochs"] == 3 and d["objectives"][0]["lambd"] == 0.01
    assert d["encoder"]["backbone"]["hidden_dims"] == [32, 32] and d["name"] == "plain_string"
    assert load_recipe(d).trainer.clip_grad_norm == 1.5
    assert "trainer.max_epochs: expected int" in str(error_of(SSL, ["trainer.max_epochs=2.5"]))


@pytest.mark.parametrize(("assignment", "message"), [
    ("trainer.max_epochs", "--set expects key=value"),
    ("objectives[4].lambd=1", "--set objectives[4].lambd: objectives[4] does not exist"),
    ("seed.x=1", "--set seed.x: seed is not a table"),
    ("trainer..x=1", "--set: cannot parse key path"),
])
def test_bad_overrides(assignment, message):
    assert str(error_of(SSL, [assignment])).startswith(message)


def test_parse_path():
    assert parse_path("objectives[1].lambd") == ["objectives", 1, "lambd"]
    assert parse_path("a.b[0][2].c") == ["a", "b", 0, 2, "c"]


def test_missing_recipe_file_and_invalid_toml(tmp_path):
    assert "does not exist" in str(error_of(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    assert "invalid TOML" in str(error_of(bad))


def test_objective_needing_logits_checks_the_encoder_width(splits):
    sup = tomllib.loads((RECIPES / "supervised_digits.toml").read_text())
    err = error_of(sup, ["encoder.out_dim=7"], splits=splits)
    assert err.path == "encoder.out_dim" and "10 classes, got 7" in str(err)


def test_unknown_optimizer_and_option():
    recipe = load_recipe(SSL, ['optimizer.name="adamz"'])
    with pytest.raises(ConfigError, match=r"optimizer.name: unknown optimizer 'adamz'"):
        build_optimizer(recipe.optimizer)
    recipe = load_recipe(SSL, ["optimizer.options.momentun=0.9", 'optimizer.name="sgd"'])
    with pytest.raises(ConfigError, match=r"optimizer.options.momentun: SGD has no parameter"):
        build_optimizer(recipe.optimizer)


def test_concepts_page_documents_every_recipe_key():
    import attrs

    from sdk.config import (
        AugmentConfig,
        DataConfig,
        EvaluationConfig,
        OptimizerConfig,
        Recipe,
        TrainerConfig,
    )

    page = (RECIPES.parents[1] / "docs" / "concepts.md").read_text().split("## Recipes", 1)[1]
    tables = {DataConfig: "data", OptimizerConfig: "optimizer", TrainerConfig: "trainer",
              EvaluationConfig: "evaluation"}
    for cls, table in tables.items():
        section = page.split(f"| `[{table}]` | ", 1)[1].split("\n| `[", 1)[0]
        for field in attrs.fields(cls):
            assert f"| `{field.name}` |" in f"| {section}", (table, field.name)
            if cls is TrainerConfig:  # the meaning column is the setting's one-line doc
                row = f"| {section}".split(f"| `{field.name}` |", 1)[1].split("\n", 1)[0]
                assert row.rsplit("|", 2)[1].strip().replace("`", "") == field.metadata["doc"]
    for field in attrs.fields(AugmentConfig):
        assert f"`{field.name}`" in page.split("| `augment` |", 1)[1].split("\n", 1)[0]
    for field in attrs.fields(Recipe):
        assert f"`{field.name}`" in page or f"[{field.name}]" in page, field.name


# build context: only parameters marked FromData are filled -----------------------------------


class _Probe:
    """A plugin with an unmarked ``labels``, a marked ``targets`` and a marked ``classes``."""

    def __init__(self, labels: list | None = None,
                 targets: Annotated[list | None, FromData("labels")] = None,
                 classes: Annotated[int | None, FromData("num_classes")] = None):
        self.labels, self.targets, self.classes = labels, targets, classes


@pytest.fixture
def probe_registry(monkeypatch):
    from sdk import registry

    reg = registry.Registry()
    reg.add(_Probe, card=Card(name="probe", kind="callback", title="Probe", summary="Records its inputs."))
    monkeypatch.setattr(registry, "_GLOBAL", reg)
    return reg


def test_only_marked_parameters_are_filled_from_the_data(probe_registry):
    context = BuildContext(num_classes=3, labels=[0, 1, 2])
    probe = create(PluginSpec(name="probe"), "callback", "callbacks[0]", context)
    assert probe.labels is None  # a parameter merely called labels is left alone
    assert probe.targets == [0, 1, 2] and probe.classes == 3
    # a value the recipe gives wins over the data
    probe = create(PluginSpec(name="probe", params={"classes": 5, "labels": [7]}), "callback",
                   "callbacks[0]", context)
    assert probe.classes == 5 and probe.labels == [7] and probe.targets == [0, 1, 2]


def test_filled_values_are_type_checked_against_the_inner_type(probe_registry):
    with pytest.raises(ConfigError, match=r"callbacks\[0\]\.classes: .*expected int \| None") as err:
        create(PluginSpec(name="probe"), "callback", "callbacks[0]",
               BuildContext(num_classes="ten"))
    assert err.value.path == "callbacks[0].classes"


def test_in_dim_goes_to_the_innermost_encoder_only():
    context = BuildContext(in_dim=13, num_classes=3)
    nested = create(PluginSpec(name="projection_head", params={"backbone": PluginSpec(name="mlp")}),
                    "encoder", "encoder", context)
    assert nested.backbone.in_dim == 13 and nested.in_dim == nested.backbone.out_dim
    assert create(PluginSpec(name="projection_head"), "encoder", "encoder", context).in_dim == 13
    assert create(PluginSpec(name="mixup"), "transform", "transforms[0]", context).num_classes == 3
    # an objective's in_dim (backbone feature width) is not the data's input width: unmarked
    amc = create(PluginSpec(name="adaptive_multihead_contrastive"), "objective", "objectives[0]",
                 context)
    assert amc.in_dim == 512


def test_from_data_names_a_known_value():
    with pytest.raises(ValueError, match=r"FromData\('label'\): unknown data value; one of "
                                         r"in_dim, num_classes, labels, dataset"):
        FromData("label")
    assert sdk.FromData is FromData


def test_cards_show_what_is_filled_from_the_data(capsys, monkeypatch):
    from sdk.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    (param,) = [p for p in sdk.registry.get_registry().get("transform", "mixup").card.params
                if p.name == "num_classes"]
    assert param.type == "int | None" and param.from_data == "num_classes"
    assert param.default_text() == "None; filled from the data (num_classes)"
    (alpha,) = [p for p in sdk.registry.get_registry().get("transform", "mixup").card.params
                if p.name == "alpha"]
    assert alpha.from_data == "" and alpha.default_text() == "0.2"
    with pytest.raises(ConfigError, match=r"parameter 'num_classes' expected int \| None"):
        sdk.create("transform", "mixup", num_classes="ten")
    assert main(["plugins", "show", "mixup"]) == 0
    assert "None; filled from the data (num_classes)" in capsys.readouterr().out


# trainer settings: declared once (TrainerConfig), read by the recipe, the Trainer and the CLI ----


def test_trainer_and_cli_take_every_trainer_setting():
    import inspect

    import attrs

    from sdk.cli_run import trainer_settings_help
    from sdk.config import TrainerConfig

    signature = inspect.signature(sdk.Trainer).parameters
    help_text = trainer_settings_help()
    for field in attrs.fields(TrainerConfig):
        param = signature[field.name]
        assert param.kind is param.KEYWORD_ONLY and param.default == field.default, field.name
        assert param.annotation == field.type, field.name
        line = next(ln for ln in help_text.splitlines() if f" trainer.{field.name} " in ln)
        assert line.endswith(field.metadata["doc"]) and f"default {field.default!r}" in line
    assert "trainer.accumulate" in help_text and "int (>= 1), default 1" in help_text
    assert "float | None (> 0), default None" in help_text


def test_trainer_settings_are_checked_by_name():
    import torch

    encoder, objective = sdk.create("encoder", "mlp", out_dim=10), sdk.create("objective",
                                                                              "cross_entropy")
    for settings, param, message in [
            ({"max_epochs": 1, "accumulate": 0}, "accumulate", "accumulate: must be >= 1, got 0"),
            ({"max_epochs": "x"}, "max_epochs", 'max_epochs: expected int, got "x"'),
            ({"max_epoch": 1}, "max_epoch", "max_epoch: unknown key; did you mean 'max_epochs'?"),
            ({"max_epochs": 1, "log_every": True}, "log_every", "log_every: expected int, got true")]:
        with pytest.raises(ConfigError) as err:
            sdk.Trainer(encoder, objective, **settings)
        assert err.value.param == param and str(err.value).startswith(message), str(err.value)
    trainer = sdk.Trainer(encoder, objective, max_steps=2, clip_grad_norm=1,
                          device=torch.device("cpu"))
    assert trainer.config.clip_grad_norm == 1.0 and trainer.clip_grad_norm == 1.0
    assert trainer.config.device == "cpu" and trainer.device == torch.device("cpu")


def test_every_recipe_trainer_setting_reaches_the_trainer(splits):
    from sdk.cli_run import make_trainer

    recipe = load_recipe(SSL, ["trainer.max_steps=5", "trainer.accumulate=2", "trainer.log_every=7",
                               "trainer.clip_grad_norm=1.5", "trainer.checkpoint_every=3",
                               'trainer.device="cpu"', 'trainer.precision="bf16-mixed"',
                               "trainer.compile=true"])
    trainer = make_trainer(recipe, build(recipe, splits))
    assert trainer.config == recipe.trainer
    assert (trainer.accumulate, trainer.log_every, trainer.checkpoint_every) == (2, 7, 3)


ADDED_SETTING = \
    '    warmup_steps: int = setting(0, "steps of learning-rate warm-up", annotated_types.Ge(0))\n'


def test_a_setting_added_to_trainer_config_needs_no_other_edit(tmp_path):
    """Copy sdk/, add one field to TrainerConfig, and find it in the recipe schema (with its
    checks and the closest-name suggestion), the Trainer's signature and arguments, the
    recipe-to-Trainer path and the CLI help, in a fresh interpreter."""
    import os
    import shutil
    import subprocess

    root = RECIPES.parents[1]
    shutil.copytree(root / "sdk", tmp_path / "sdk", ignore=shutil.ignore_patterns("__pycache__"))
    config = tmp_path / "sdk" / "config.py"
    anchor = "    checkpoint_every: int | None = setting("
    assert anchor in config.read_text()
    config.write_text(config.read_text().replace(anchor, ADDED_SETTING + anchor, 1))
    script = f"""
import inspect, sdk
from sdk import data
from sdk.cli_run import build, make_trainer, trainer_settings_help
from sdk.config import load_recipe
from sdk.errors import ConfigError
assert sdk.__file__.startswith({str(tmp_path)!r}), sdk.__file__
recipe = load_recipe({str(RECIPES / "barlow_twins_digits.toml")!r},
                     ["trainer.warmup_steps=4", "trainer.max_steps=1"])
print("recipe", recipe.trainer.warmup_steps)
for bad in ("trainer.warmup_step=4", "trainer.warmup_steps=-1", "trainer.warmup_steps=1.5"):
    try:
        load_recipe({str(RECIPES / "barlow_twins_digits.toml")!r}, [bad])
    except ConfigError as exc:
        print("error", exc.path, "|", str(exc).split(" accepted")[0])
print("signature", inspect.signature(sdk.Trainer).parameters["warmup_steps"])
print("trainer", make_trainer(recipe, build(recipe, data.load("digits"))).warmup_steps)
print("help", [ln.split() for ln in trainer_settings_help().splitlines() if "warmup" in ln][0])
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "recipe 4",
        "error trainer.warmup_step | trainer.warmup_step: unknown key; did you mean "
        "'warmup_steps'?",
        "error trainer.warmup_steps | trainer.warmup_steps: must be >= 0, got -1",
        'error trainer.warmup_steps | trainer.warmup_steps: expected int, got 1.5',
        "signature warmup_steps: int = 0",
        "trainer 4",
        "help ['trainer.warmup_steps', 'int', '(>=', '0),', 'default', '0', 'steps', 'of', "
        "'learning-rate', 'warm-up']",
    ]
