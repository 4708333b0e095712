"""TOML recipes: structuring, --set overrides, error messages that name the key path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from sdk import data
from sdk.cli_run import build
from sdk.config import (
    ObjectiveSpec,
    PluginSpec,
    apply_override,
    build_optimizer,
    dump_toml,
    load_recipe,
    parse_path,
    tomllib,
    unstructure,
)
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
    recipe = load_recipe(path)
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
    assert "Did you mean 'barlow_twins'?" in str(err)
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
     'objectives[0].weight: expected a number or a schedule table, got "x"'),
    (lambda d: d.update(trainr={}), "trainr: unknown key; did you mean 'trainer'?"),
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
    for field in attrs.fields(AugmentConfig):
        assert f"`{field.name}`" in page.split("| `augment` |", 1)[1].split("\n", 1)[0]
    for field in attrs.fields(Recipe):
        assert f"`{field.name}`" in page or f"[{field.name}]" in page, field.name
