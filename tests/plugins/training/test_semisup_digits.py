"""The semi-supervised claims on digits with 5% of the labels (examples/semisup_digits.py at one
seed and 300 steps): FixMatch and self-training beat the labelled-only model, ShrinkMatch is no
worse than FixMatch (within the seed-to-seed spread of about 0.03 the README table shows)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import semisup_digits  # noqa: E402


@pytest.fixture(scope="module")
def accuracy():
    return {m: semisup_digits.run(m, seed=0, steps=300)
            for m in ("labelled only", "fixmatch", "shrinkmatch", "self_training")}


def test_fixmatch_and_self_training_beat_the_labelled_only_model(accuracy):
    base = accuracy["labelled only"]
    assert accuracy["fixmatch"] > base + 0.02, accuracy
    assert accuracy["self_training"] > base + 0.02, accuracy


def test_shrinkmatch_is_no_worse_than_fixmatch(accuracy):
    assert accuracy["shrinkmatch"] > accuracy["labelled only"], accuracy
    assert accuracy["shrinkmatch"] >= accuracy["fixmatch"] - 0.03, accuracy
