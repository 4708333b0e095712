"""Sweeps: one recipe run at every point of a grid of recipe keys.

A recipe's ``[sweep]`` table, or ``paperplug run RECIPE --sweep KEY=V1,V2,...`` (repeatable;
it replaces the table's entry for the same key), maps recipe key paths (as ``--set`` names
them: ``optimizer.lr``, ``objectives[0].temperature``, ``data.label_fraction``) to lists of
values. Every point of their Cartesian product is the recipe with those values set, checked
(errors name the key path) before anything trains, and run by :func:`sdk.cli_run.run_recipe`
in its own directory ``DIR/<key>=<value>,...``, in ``jobs`` processes at once, each with an
equal share of the CPU threads. The sweep then writes ``DIR/sweep.json`` and ``DIR/sweep.csv``
(one row per point: the swept values and every number of the point's summary) and
``DIR/sweep.png`` (the swept metric against the first key, a line per value of the others).

Running the same sweep again in the same directory reads each finished point's
``summary.json`` instead of training it again and resumes a point that stopped part-way from
its newest checkpoint.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from sdk.config import (
    Recipe,
    _toml_value,
    apply_override,
    parse_path,
    read_recipe,
    structure,
    unstructure,
)
from sdk.errors import ConfigError

SWEEP_JSON, SWEEP_CSV, SWEEP_PNG = "sweep.json", "sweep.csv", "sweep.png"
METRICS = ("accuracy", "linear_probe_accuracy", "knn_accuracy")
"""The swept metric when none is named: the first of these a point's summary holds."""


@attrs.frozen
class Point:
    """One run of a sweep: the swept ``values`` (key path -> value), the recipe with them set
    and the name of its directory."""

    values: Mapping[str, Any]
    recipe: Recipe
    name: str


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` or ``KEY=[V1, V2]`` (each value read as TOML, else as a string) ->
    ``(KEY, [values])``; the key must be a recipe key path."""
    from sdk.config import _parse_value

    if "=" not in text:
        raise ConfigError(f"--sweep expects KEY=V1,V2,..., got {text!r}")
    key, values = (part.strip() for part in text.split("=", 1))
    parse_path(key)
    parsed = _parse_value(values if values.startswith("[") else f"[{values}]")
    if not isinstance(parsed, list):  # not TOML: comma-separated strings
        parsed = [v.strip() for v in values.split(",")]
    return key, _values(key, parsed)


def _values(key: str, values: Any) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep.{key}: expected a non-empty array of values, got "
                          f"{json.dumps(values, default=str)}", path=f"sweep.{key}")
    if len({json.dumps(v, sort_keys=True, default=str) for v in values}) < len(values):
        raise ConfigError(f"sweep.{key}: a value is given twice in {values}", path=f"sweep.{key}")
    return list(values)


def sweep_table(data: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The ``[sweep]`` table of a recipe's data, checked: key paths to non-empty arrays."""
    table = data.get("sweep", {})
    if not isinstance(table, Mapping):
        raise ConfigError("sweep: expected a table of KEY = [values]", path="sweep")
    out = {}
    for key, values in table.items():
        try:
            parse_path(key)
        except ConfigError as exc:
            raise ConfigError(f"sweep: {exc}", path=f"sweep.{key}") from None
        out[key] = _values(key, values)
    return out


def points(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (),
           sweeps: Sequence[str] = (), *, allow_imports: bool = False) -> list[Point]:
    """Every point of the sweep of ``source`` (its ``[sweep]`` table, then ``sweeps``:
    ``KEY=V1,V2`` arguments), each recipe structured and checked; ``[]`` when nothing is
    swept. ``overrides`` (``--set``) apply to every point, before the swept values."""
    data = read_recipe(source)
    table = sweep_table(data)
    data.pop("sweep", None)
    for text in sweeps:
        key, values = parse_sweep(text)
        table[key] = values
    if not table:
        return []
    for assignment in overrides:
        apply_override(data, assignment)
    keys = list(table)
    out = []
    for combination in itertools.product(*(table[k] for k in keys)):
        point = copy.deepcopy(data)
        values = dict(zip(keys, combination))
        for key, value in values.items():
            apply_override(point, f"{key}={_toml(value)}")
        try:
            recipe = structure(point, allow_imports=allow_imports)
        except ConfigError as exc:
            at = ", ".join(f"{k}={_toml(v)}" for k, v in values.items())
            raise ConfigError(f"sweep point {at}: {exc}", path=exc.path) from None
        out.append(Point(values=values, recipe=recipe, name=_dir_name(values)))
    return out


def _toml(value: Any) -> str:
    """``value`` as one inline TOML value (an array of tables as inline tables)."""
    return _toml_value(value)


def _dir_name(values: Mapping[str, Any]) -> str:
    text = ",".join(f"{k}={_toml(v)}" for k, v in values.items())
    return "".join(c if c.isalnum() or c in "=.,-_[]" else "_" for c in text)


def _run_point(recipe_data: dict[str, Any], run_dir: str, threads: int, allow_imports: bool
               ) -> dict[str, Any]:
    """A sweep point in a worker process: its run, or the summary it already wrote (a staged
    point's finished stages are read back, the rest run)."""
    import torch

    from sdk.cli_run import run

    recipe = structure(recipe_data, allow_imports=allow_imports)
    done = Path(run_dir) / "summary.json"
    if not recipe.stages and done.is_file():
        summary = json.loads(done.read_text())
        if "recipe" in summary:  # the run's summary, not the one training writes before it
            return summary
    torch.set_num_threads(threads)
    resume = bool(recipe.stages) or (Path(run_dir) / "checkpoints").is_dir()
    return run(recipe, run_dir=run_dir, resume=resume, progress=False)


def run_sweep(swept: Sequence[Point], out_dir: str | Path, *, jobs: int | None = None,
              metric: str | None = None, allow_imports: bool = False, console: Any = None
              ) -> list[dict[str, Any]]:
    """Run every point (``jobs`` processes at once; default: as many as the CPU cores allow
    at one thread each, at most one per point) and write the table and the plot; returns the
    rows."""
    import concurrent.futures
    import multiprocessing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    jobs = max(1, min(len(swept), jobs if jobs is not None else cores))
    threads = max(1, cores // jobs)
    args = [(unstructure(p.recipe), str(out_dir / p.name), threads, allow_imports) for p in swept]
    if jobs == 1:
        summaries = [_run_point(*a) for a in args]
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch or thread state
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            summaries = list(pool.map(_run_point, *zip(*args)))
    rows = [{**p.values, **{k: v for k, v in s.items() if _number(v)}}
            for p, s in zip(swept, summaries)]
    write_table(rows, list(swept[0].values), out_dir)
    chosen = metric or next((m for m in METRICS if all(m in r for r in rows)), None)
    if chosen is not None:
        if any(chosen not in r for r in rows):
            raise ConfigError(f"--metric {chosen}: not in every point's summary (it has "
                              f"{sorted(k for k in rows[0] if k not in swept[0].values)})")
        plot(rows, list(swept[0].values), chosen, out_dir / SWEEP_PNG)
    if console is not None:
        console.print(f"sweep of {len(rows)} runs: {out_dir / SWEEP_CSV}"
                      + (f", {chosen} in {out_dir / SWEEP_PNG}" if chosen else ""))
    return rows


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], out_dir: Path) -> None:
    """``sweep.json`` (the rows) and ``sweep.csv`` (the swept keys first, then every metric)."""
    (out_dir / SWEEP_JSON).write_text(json.dumps(list(rows), indent=2, default=str))
    metrics = sorted({k for r in rows for k in r if k not in keys})
    with (out_dir / SWEEP_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, [*keys, *metrics])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _toml(v) if k in keys and not _number(v) else v
                             for k, v in row.items()})


def plot(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str, path: Path) -> Path:
    """``metric`` against the first swept key (its values in order; a numeric key on a log
    axis when they span a decade or more), one line per value of the other keys."""
    from sdk import plots

    plt = plots._pyplot()
    first, rest = keys[0], keys[1:]
    xs = list(dict.fromkeys(_toml(r[first]) for r in rows))  # as TOML: a value may be an array
    numeric = all(_number(r[first]) for r in rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for group in dict.fromkeys(tuple(_toml(r[k]) for k in rest) for r in rows):
        line = [r for r in rows if tuple(_toml(r[k]) for k in rest) == group]
        x = [r[first] if numeric else xs.index(_toml(r[first])) for r in line]
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, group)) or None
        ax.plot(x, [r[metric] for r in line], "o-", label=label)
    values = [r[first] for r in rows]
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    ax.set(xlabel=first, ylabel=metric, title=f"{metric} over {first}")
    if rest:
        ax.legend()
    fig.tight_layout()
    return plots.save(fig, path)
