"""A short supervised digits run through ``paperplug run`` with one tracker callback, and the
records of its metrics.jsonl that the tracker must have received."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdk.cli import main

RECIPE = Path(__file__).resolve().parents[3] / "examples" / "recipes" / "supervised_digits.toml"


@pytest.fixture
def tracked_run(tmp_path, monkeypatch):
    """``run(table) -> (run_dir, records, summary)``: the recipe plus ``[[callbacks]]`` table,
    12 steps logged every 4."""
    monkeypatch.setenv("CI", "1")

    def run(callback_table: str):
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(RECIPE.read_text() + "\n[[callbacks]]\n" + callback_table + "\n")
        run_dir = tmp_path / "run"
        code = main(["run", str(recipe), "--run-dir", str(run_dir), "--set",
                     "trainer.max_steps=12", "--set", "trainer.log_every=4"])
        assert code == 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8, 12]
        return run_dir, records, json.loads((run_dir / "summary.json").read_text())

    return run


def _expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` as a tracker must log them."""
    from sdk.tracking import scalars

    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        kind = "train" if r["kind"] == "train" else "epoch"
        for key, value in scalars(r, kind).items():
            out.setdefault(key, []).append((r["step"], value))
    return out


@pytest.fixture
def expected_scalars():
    return _expected_scalars
