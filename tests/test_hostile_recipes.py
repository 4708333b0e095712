"""Recipes under hostile input: generated TOML either builds or fails with a ConfigError that
names the key path of the offending value, never another exception."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdk
from sdk import data, stages
from sdk.card import KINDS
from sdk.cli_run import prepare
from sdk.config import dump_toml, load_recipe, tomllib
from sdk.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
BASES = {p.stem: tomllib.loads(p.read_text()) for p in sorted(RECIPES.glob("*.toml"))}
for _base in BASES.values():  # a sweep's table is checked by sdk.sweep (tests/test_sweep.py)
    _base.pop("sweep", None)
PLUGIN_NAMES = sorted({card.name for card in sdk.get_registry().cards()})
# checks that relate two tables: an error there may follow from a value elsewhere
CROSS_TABLE = ("encoder.out_dim", "data.augment", "teacher", "sampler")

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# values -------------------------------------------------------------------------------------

HUGE = st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 2**63 - 1, -(2**63)])
SPECIAL_FLOATS = st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324, -1.0])
SCALARS = st.one_of(
    st.integers(-300, 300), HUGE, st.floats(allow_nan=True, allow_infinity=True), SPECIAL_FLOATS,
    st.text(max_size=12), st.sampled_from(["", "🙂", "名前", "\x00", "\u202e", "a\nb", "\x7f"]),
    st.booleans(),
)


def _nest(depth: int, table: bool) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"k": value} if table else [value]
    return value


DEEP = st.builds(_nest, st.integers(1, 80), st.booleans())
KEYS = st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(["name", "kind", "weight"]))
PLUGIN_TABLES = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(PLUGIN_NAMES), st.text(max_size=8))},
    optional={"kind": st.sampled_from([*KINDS, "bogus"]), "extra": SCALARS})
VALUES = st.one_of(
    SCALARS, DEEP, PLUGIN_TABLES,
    st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6),
)


def _like(value: object) -> st.SearchStrategy:
    """A value of the same TOML type as ``value``, possibly out of range."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(-300, 300), HUGE)
    if isinstance(value, float):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), SPECIAL_FLOATS)
    if isinstance(value, str):
        return st.one_of(st.sampled_from(PLUGIN_NAMES), st.text(max_size=12))
    return VALUES


# documents ----------------------------------------------------------------------------------


def _spots(node: object, path: tuple = ()) -> list[tuple[tuple, object]]:
    """Every (key path, value) below ``node``."""
    items = (node.items() if isinstance(node, dict)
             else enumerate(node) if isinstance(node, list) else ())
    out = []
    for key, value in items:
        out.append(((*path, key), value))
        out.extend(_spots(value, (*path, key)))
    return out


def _text(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _parent(doc: dict, path: tuple) -> object:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated_recipes(draw) -> tuple[dict, list[str]]:
    """An example recipe with one to three hostile edits, and the key paths they touched."""
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        spots = _spots(doc)
        if not spots:
            break
        path, value = draw(st.sampled_from(spots))
        op = draw(st.sampled_from(["replace", "retype", "drop", "add"]))
        parent = _parent(doc, path)
        if op == "add":
            where = path if isinstance(value, dict) else path[:-1]
            table = value if isinstance(value, dict) else parent
            if not isinstance(table, dict):
                continue
            key = draw(KEYS)
            table[key] = draw(VALUES)
            path = (*where, key)
        elif op == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_like(value) if op == "retype" else VALUES)
        if len(path) > 1 and path[-1] in ("name", "kind"):  # another plugin: its parameters differ
            path = path[:-1]
        touched.append(_text(path))
    return doc, touched


def _related(error_path: str, touched: list[str]) -> bool:
    """The error names a touched key, a key under or above it, another parameter of the same
    plugin table (a constraint between parameters), or a table whose check spans tables; a
    stage's key is related to the top-level key it inherits (``stages[1].trainer`` and
    ``trainer``)."""
    def under(a: str, b: str) -> bool:
        return a == b or a.startswith((b + ".", b + "["))

    def inherited(path: str) -> str:
        return re.sub(r"^stages\[\d+\]\.", "", path)

    def table(path: str) -> str:
        return re.sub(r"(\.[^.\[\]]+|\[\d+\])$", "", path)

    if "stages" in touched:  # the stages as a whole replaced or dropped: any key may fail
        return True
    pairs = [(e, t) for t in touched for e, t in ((error_path, t), (inherited(error_path),
                                                                    inherited(t)))]
    return any(under(e, t) or under(t, e) or under(t, table(e)) and "." in e
               for e, t in pairs) or any(under(error_path, c) for c in CROSS_TABLE)


@pytest.fixture(scope="module")
def splits():
    return data.load("digits")


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile") / "recipe.toml"


@settings(FUZZ, max_examples=400)
@given(mutated_recipes())
def test_mutated_recipes_build_or_name_the_offending_key(splits, recipe_file, case):
    """Load the recipe from TOML text and build everything a run builds before training (every
    stage of a staged recipe)."""
    doc, touched = case
    recipe_file.write_text(dump_toml(doc), encoding="utf-8")
    try:
        recipe = load_recipe(recipe_file)
        stages.check(recipe) if recipe.stages else prepare(recipe)
    except ConfigError as exc:
        message = str(exc)
        assert exc.path, message
        assert exc.path in message, message
        assert _related(exc.path, touched), (touched, message)


@st.composite
def mangled_texts(draw) -> str:
    """An example recipe's text with a slice deleted, duplicated or replaced by random text."""
    text = (RECIPES / f"{draw(st.sampled_from(sorted(BASES)))}.toml").read_text()
    i = draw(st.integers(0, len(text)))
    j = draw(st.integers(i, min(len(text), i + 40)))
    insert = draw(st.one_of(st.just(""), st.just(text[i:j] * 2), st.text(max_size=20),
                            st.sampled_from(["[", "]]", "=", '"', "\\u", "[[objectives]]\n",
                                             "x = " + "[" * 2000])))
    return text[:i] + insert + text[j:]


@FUZZ
@given(st.one_of(st.text(max_size=200), mangled_texts()))
def test_any_text_loads_or_fails_with_a_config_error(recipe_file, text):
    recipe_file.write_text(text, encoding="utf-8")
    try:
        load_recipe(recipe_file)
    except ConfigError as exc:
        assert str(recipe_file) in str(exc) or exc.path and exc.path in str(exc), str(exc)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=100))
def test_any_bytes_load_or_fail_with_a_config_error(recipe_file, raw):
    recipe_file.write_bytes(raw)
    try:
        load_recipe(recipe_file)
    except ConfigError:
        pass


# regressions: each a defect the generated recipes found ----------------------------------------

SSL = BASES["barlow_twins_digits"]


def error_of(source, overrides=(), build=True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        recipe = load_recipe(source, overrides)
        if build:
            prepare(recipe)
    return info.value


def edited(edit) -> dict:
    doc = copy.deepcopy(SSL)
    edit(doc)
    return doc


@pytest.mark.parametrize(("text", "message"), [
    ("x = " + "[" * 3000 + "]" * 3000, "invalid TOML: arrays or tables nested too deeply"),
    ("x = " + "{a=" * 3000 + "1" + "}" * 3000, "invalid TOML: arrays or tables nested too deeply"),
    ("x = " + "9" * 5000, "invalid TOML: Exceeds the limit (4300 digits)"),
])
def test_pathological_toml_text(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    assert message in str(error_of(path))


def test_unreadable_recipe_files(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b"\xff\xfe name = 1")
    assert str(error_of(path)).endswith("r.toml: not UTF-8 text (byte 0)")
    assert "cannot be read: Is a directory" in str(error_of(tmp_path))


def test_values_toml_cannot_hold_are_refused_with_their_path():
    err = error_of(edited(lambda d: d["optimizer"].update(lr=10**400)))
    assert str(err).startswith("optimizer.lr: integer out of TOML's 64-bit range")
    assert err.path == "optimizer.lr"
    err = error_of(edited(lambda d: d["objectives"][0].update(weight=2**63)))
    assert err.path == "objectives[0].weight"
    err = error_of(SSL, ["trainer.max_epochs=" + "9" * 30])
    assert str(err).startswith("--set trainer.max_epochs: integer out of TOML's 64-bit range")
    err = error_of(SSL, ["trainer.max_epochs=" + "9" * 5000])
    assert str(err).startswith("--set trainer.max_epochs: Exceeds the limit")
    err = error_of(SSL, ["trainer.max_epochs=" + "[" * 100 + "]" * 100])
    assert str(err).startswith("--set trainer.max_epochs") and "deeper than 32 levels" in str(err)
    deep = edited(lambda d: d["encoder"].update(x=_nest(40, table=False)))
    err = error_of(deep)
    assert err.path == "encoder.x" + "[0]" * 31 and "nested deeper than 32 levels" in str(err)
    assert error_of({**SSL, 3: 1}).path == ""
    assert "not a TOML value: object" in str(error_of({**SSL, "x": object()}))
    assert "lone surrogate" in str(error_of({**SSL, "name": "\ud800"}))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(objectives="barlow_twins"),
     'objectives: expected an array of tables, got "barlow_twins"'),
    (lambda d: d.update(objectives=5), "objectives: expected an array of tables, got 5"),
    (lambda d: d.update(transforms={"name": "mixup"}), "transforms: expected an array of tables"),
    (lambda d: d.update(callbacks="abc"), 'callbacks: expected an array of tables, got "abc"'),
    (lambda d: d["optimizer"].update(options="x"), 'optimizer.options: expected a table, got "x"'),
    (lambda d: d["encoder"].update(kind=5), "encoder.kind: expected str, got 5"),
    (lambda d: d["encoder"]["backbone"].update(name=5), "encoder.backbone.name: expected str, got 5"),
    (lambda d: d["objectives"][0].update(weight=math.nan),
     "objectives[0].weight: expected a finite number or a schedule table, got NaN"),
    (lambda d: d["objectives"][0].update(weight=-math.inf), "objectives[0].weight: expected a finite"),
    (lambda d: d["data"].update(batch_size=0), "data.batch_size: must be >= 1, got 0"),
    (lambda d: d["data"].update(num_workers=-1), "data.num_workers: must be >= 0, got -1"),
    (lambda d: d["data"].update(test_fraction=math.nan), "data.test_fraction: must be >= 0, got NaN"),
    (lambda d: d["data"].update(calibration_fraction=1.0),
     "data.calibration_fraction: must be < 1, got 1.0"),
    (lambda d: d["data"]["augment"].update(noise=-math.inf),
     "data.augment.noise: must be >= 0, got -Infinity"),
    (lambda d: d["data"]["augment"].update(mask=1.5), "data.augment.mask: must be < 1, got 1.5"),
    (lambda d: d["data"]["augment"].update(shift=-1), "data.augment.shift: must be >= 0, got -1"),
    (lambda d: d["evaluation"].update(knn_k=0), "evaluation.knn_k: must be >= 1, got 0"),
    (lambda d: d["evaluation"].update(knn_temperature=0.0),
     "evaluation.knn_temperature: must be > 0, got 0.0"),
    (lambda d: d.update(name="../x"), 'name: must be usable as a directory name'),
    (lambda d: d.update(name=""), 'name: must be usable as a directory name'),
])
def test_hostile_values_are_refused_when_the_recipe_is_read(edit, message):
    err = error_of(edited(edit), build=False)
    assert str(err).startswith(message), str(err)
    assert err.path == message.split(":", 1)[0]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["data"].update(name="same_index"), "data.name: unknown dataset 'same_index'"),
    (lambda d: d["data"].update(calibration_fraction=0.5, test_fraction=0.5),
     "data.test_fraction: calibration_fraction + test_fraction must be < 1, got 0.5 + 0.5"),
    (lambda d: d["data"].update(calibration_fraction=1e-9),
     "data.calibration_fraction: leaves the calibration split of 'digits' empty"),
    (lambda d: d["data"].update(name="wine"),
     "data.augment.shift: shift needs image data (digits)"),
    (lambda d: d["data"].pop("augment"),
     "data.augment: the objective needs 2 views of each sample; give data.augment or "
     "[[transforms]]"),
    (lambda d: d["trainer"].pop("max_epochs"),
     "trainer.max_epochs: give max_epochs or max_steps (or both)"),
    (lambda d: d["trainer"].update(device="gpu:0"), "trainer.device: not a torch device: "),
    (lambda d: d["trainer"].update(device="cpu", precision="fp16-mixed"),
     "trainer.precision: precision 'fp16-mixed' (float16 with a GradScaler) needs a CUDA device"),
    (lambda d: d["encoder"].update(out_dim=2**62),
     "encoder: encoder plugin 'projection_head' cannot be built from these parameters: "
     "RuntimeError: "),
    (lambda d: d["encoder"]["backbone"].update(hidden_dims=[2**62]),
     "encoder.backbone: encoder plugin 'mlp' cannot be built from these parameters: "),
    (lambda d: d["objectives"][0].update(kind="encoder"),
     "objectives[0].kind: this entry takes a plugin of kind 'objective', got kind 'encoder'"),
    (lambda d: d["encoder"]["backbone"].update(kind="objective"),
     "encoder.backbone.kind: this entry takes a plugin of kind 'encoder', got kind 'objective'"),
    (lambda d: d["calibrator"].update(kind="bogus"), "calibrator.kind: this entry takes a plugin of kind 'calibrator', got kind 'bogus'"),
    (lambda d: d["optimizer"].update(lr=-1), "optimizer.lr: AdamW rejects it: ValueError: "
                                             "Invalid learning rate: -1"),
    (lambda d: d["optimizer"].update(weight_decay=math.nan),
     "optimizer.weight_decay: AdamW rejects it: ValueError: Invalid weight_decay value: nan"),
    (lambda d: d["optimizer"].update(options={"betas": [2.0, 0.9]}),
     "optimizer.options.betas: AdamW rejects it: ValueError: Invalid beta parameter"),
    (lambda d: d.update(objectives=[{"name": "barlow_twins"}], teacher={"name": "queue"}),
     "teacher: objective 'barlow_twins' ignores the extra_negatives that teacher 'queue'"),
])
def test_hostile_values_are_refused_before_training(edit, message):
    err = error_of(edited(edit))
    assert str(err).startswith(message), str(err)
    assert err.path == message.split(":", 1)[0]


def test_written_recipes_read_back_whatever_their_strings_hold():
    doc = edited(lambda d: d["encoder"].update(note="🙂 \x00\x7f\"\\\n\t名前", **{"k\x01🙂": 1}))
    assert tomllib.loads(dump_toml(doc)) == doc


def test_a_nested_plugin_of_an_unknown_kind_names_its_kind_key():
    from sdk.config import PluginSpec, create

    with pytest.raises(ConfigError, match=r"^callbacks\[0\]\.x\.kind: unknown plugin kind 'bogus'"):
        create(PluginSpec(name="y", kind="bogus"), None, "callbacks[0].x")
