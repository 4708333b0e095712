"""``[evaluation] shifts``: the test split under a seeded distribution shift
(:func:`sdk.data.shifted`), and a run's metrics measured again on it as ``shift/<name>/...``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdk import data
from sdk.cli_run import load_splits, run_recipe, shift_splits
from sdk.config import load_recipe
from sdk.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


@pytest.fixture(scope="module")
def splits():
    return data.load("digits")


def test_a_shifted_split_is_seeded_keeps_labels_and_leaves_the_global_generator(splits):
    test = splits.test
    state = torch.random.get_rng_state()
    noisy = data.shifted(test, seed=3, noise=0.3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(noisy.y, test.y) and torch.equal(noisy.index, test.index)
    torch.manual_seed(3)  # the noise is x + 0.3 * eps with eps drawn from the seed
    assert torch.allclose(noisy.x, test.x + 0.3 * torch.randn_like(test.x))
    assert torch.equal(data.shifted(test, seed=3, noise=0.3).x, noisy.x)
    assert not torch.equal(data.shifted(test, seed=4, noise=0.3).x, noisy.x)
    masked = data.shifted(test, seed=0, mask=0.5).x
    zeroed = (masked == 0) & (test.x != 0)
    assert torch.equal(masked[~zeroed], test.x[~zeroed])
    assert 0.4 < zeroed.sum() / (test.x != 0).sum() < 0.6


def test_a_pixel_shift_translates_each_image_by_at_most_one_pixel(splits):
    test = splits.test
    moved = data.shifted(test, image_shape=(8, 8), seed=0, shift=1).x.view(-1, 8, 8)
    images = torch.nn.functional.pad(test.x.view(-1, 8, 8), (1, 1, 1, 1))
    translations = torch.stack([images[:, 1 - dy:9 - dy, 1 - dx:9 - dx]
                                for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)
    assert (translations == moved[:, None]).flatten(2).all(-1).any(1).all()
    assert not torch.equal(moved, test.x.view(-1, 8, 8))
    with pytest.raises(ConfigError, match="shift needs image data"):
        data.shifted(test, seed=0, shift=1)
    with pytest.raises(ConfigError, match="nothing shifts the inputs"):
        data.shifted(test, seed=0)


def test_shift_tables_are_checked_with_their_key_path():
    base = RECIPES / "supervised_digits.toml"
    with pytest.raises(ConfigError, match=r"evaluation.shifts.none: must change the test inputs"):
        load_recipe(base, ["evaluation.shifts.none={}"])
    with pytest.raises(ConfigError, match=r"evaluation.shifts.x.nois: unknown key; did you mean 'noise'"):
        load_recipe(base, ["evaluation.shifts.x={nois=0.1}"])
    with pytest.raises(ConfigError, match=r"evaluation.shifts.x.mask: must be < 1"):
        load_recipe(base, ["evaluation.shifts.x={mask=1.5}"])


def test_a_run_measures_its_test_split_again_under_each_shift(tmp_path):
    recipe = load_recipe(RECIPES / "supervised_digits.toml", [
        "trainer.max_epochs=2", "evaluation.shifts.noise={noise=1.0}",
        "evaluation.shifts.pixels={shift=1}", "evaluation.shifts.faint={scale=0.01}"])
    summary = run_recipe(recipe, run_dir=tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["shift/noise/accuracy"] == (
        summary["shift/noise/accuracy"])
    assert summary["accuracy"] > 0.75
    assert summary["shift/noise/accuracy"] < summary["accuracy"] - 0.3  # the shifted split
    assert summary["shift/pixels/accuracy"] < summary["accuracy"]
    assert abs(summary["shift/faint/accuracy"] - summary["accuracy"]) < 0.02
    tabular = load_recipe(RECIPES / "supervised_digits.toml", [
        "data.name=wine", "evaluation.shifts.pixels={shift=1}"])
    with pytest.raises(ConfigError, match="evaluation.shifts.pixels.shift: shift needs image"):
        shift_splits(tabular, load_splits(tabular.data))  # before run_recipe trains anything
