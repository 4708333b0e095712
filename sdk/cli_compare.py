"""``paperplug compare RECIPE... --epochs N --out DIR``: self-supervised recipes side by side;
``paperplug compare RUN_DIR... --out DIR``: finished runs side by side in one HTML page.

Every recipe is run by :func:`sdk.cli_run.run_recipe` under one budget (``trainer.max_epochs``
and ``seed`` overridden alike, linear probe and random-init baseline switched on), each in
``DIR/<recipe name>/``; :func:`compare_recipes` then writes ``DIR/results.json`` and
``DIR/results.md``: per recipe the objective(s), kNN and linear-probe accuracy on the test split,
RankMe of the training split's representation and wall time (of the training, and of the whole
run with evaluation and calibration in the JSON), under baseline rows for the
randomly initialised encoder and for kNN on the raw inputs.

Given run directories instead of recipes, nothing is trained: ``DIR/compare.html``
(:func:`sdk.report.compare_report`) puts their summaries in one table and overlays their
curves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sdk.cli import COMMANDS

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def budget_overrides(epochs: int, seed: int) -> list[str]:
    """The ``--set`` assignments every compared recipe receives."""
    return [f"trainer.max_epochs={epochs}", f"seed={seed}", "evaluation.linear_probe=true",
            "evaluation.random_init=true"]


def load_compared(paths: list[str], epochs: int, seed: int, overrides: list[str] = (), *,
                  allow_imports: bool = False) -> list[Any]:
    """Load and check every recipe before any training: each builds, is self-supervised, and
    all use one dataset and split; names must differ (they name the run directories)."""
    from sdk.cli_run import build, load_splits
    from sdk.config import load_recipe
    from sdk.errors import ConfigError

    recipes = []
    for path in paths:
        recipe = load_recipe(path, [*budget_overrides(epochs, seed), *overrides],
                             allow_imports=allow_imports)
        parts = build(recipe, load_splits(recipe.data))
        if parts["objective"].requires.get("logits"):
            names = " + ".join(s.name for s in recipe.objectives)
            raise ConfigError(f"{path}: objectives: compare measures self-supervised "
                              f"representations, but {names} trains on labels (needs logits)",
                              path="objectives")
        recipes.append(recipe)
    split = {(r.data.name, r.data.calibration_fraction, r.data.test_fraction, r.data.split_seed)
             for r in recipes}
    if len(split) > 1:
        raise ConfigError(f"data: compared recipes must share dataset and split (name, "
                          f"calibration_fraction, test_fraction, split_seed), got "
                          f"{sorted(split)}", path="data")
    seen: dict[str, str] = {}
    for path, recipe in zip(paths, recipes, strict=True):
        if recipe.name in seen:
            raise ConfigError(f"name: {path} and {seen[recipe.name]} are both named "
                              f"{recipe.name!r}; their runs would share a directory", path="name")
        seen[recipe.name] = path
    return recipes


def result_row(recipe: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """One recipe's row of the table, from its run summary."""
    return {"method": " + ".join(s.name for s in recipe.objectives), "recipe": recipe.name,
            "knn_accuracy": summary["knn_accuracy"],
            "linear_probe_accuracy": summary["linear_probe_accuracy"],
            "rankme": summary["rankme"], "train_time_s": summary["train/wall_time_s"],
            "wall_time_s": summary["wall_time_s"],
            "random_init_knn_accuracy": summary["random_init_knn_accuracy"],
            "random_init_linear_probe_accuracy": summary["random_init_linear_probe_accuracy"],
            "random_init_rankme": summary["random_init_rankme"],
            "input_knn_accuracy": summary["input_knn_accuracy"]}


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table: baseline rows first (one per distinct random-init
    measurement), then one row per recipe in the order given."""
    rows = results["rows"]
    head = (f"{results['dataset']}, {results['epochs']} epochs each, seed {results['seed']} "
            f"({results['n_train']} training, {results['n_test']} test samples)\n\n"
            "| method | recipe | kNN accuracy | linear-probe accuracy | RankMe | training time |\n"
            "|---|---|---|---|---|---|\n")
    baselines: dict[tuple[float, float, float], list[str]] = {}
    for r in rows:
        key = (r["random_init_knn_accuracy"], r["random_init_linear_probe_accuracy"],
               r["random_init_rankme"])
        baselines.setdefault(key, []).append(r["recipe"])
    lines = []
    for (knn, probe, rank), names in baselines.items():
        label = "random-init encoder" if len(baselines) == 1 else \
            f"random-init encoder ({', '.join(names)})"
        lines.append(f"| {label} | — | {knn:.3f} | {probe:.3f} | {rank:.1f} | — |")
    inputs = sorted({r["input_knn_accuracy"] for r in rows})
    lines += [f"| raw inputs | — | {v:.3f} | — | — | — |" for v in inputs]
    lines += [f"| {r['method']} | {r['recipe']} | {r['knn_accuracy']:.3f} | "
              f"{r['linear_probe_accuracy']:.3f} | {r['rankme']:.1f} | "
              f"{r['train_time_s']:.0f} s |" for r in rows]
    return head + "\n".join(lines) + "\n"


def compare_recipes(recipes: list[Any], *, out: str | Path, epochs: int, seed: int,
                    console: Console | None = None) -> dict[str, Any]:
    """Run each recipe (already loaded with :func:`load_compared`) in ``out/<name>`` and write
    ``out/results.json`` and ``out/results.md``; returns the results."""
    from sdk.cli_run import run_recipe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], {}
    for i, recipe in enumerate(recipes, 1):
        method = " + ".join(s.name for s in recipe.objectives)
        if console is not None:
            console.print(f"[{i}/{len(recipes)}] {recipe.name} ({method}): {epochs} epochs",
                          highlight=False, markup=False)
        summary = run_recipe(recipe, run_dir=out / recipe.name, progress=False)
        rows.append(result_row(recipe, summary))
        if console is not None:
            r = rows[-1]
            console.print(f"      kNN {r['knn_accuracy']:.3f}, linear probe "
                          f"{r['linear_probe_accuracy']:.3f}, RankMe {r['rankme']:.1f}, "
                          f"{r['train_time_s']:.0f} s training, {r['wall_time_s']:.0f} s in all",
                          highlight=False, markup=False)
    results = {"dataset": summary["dataset"], "epochs": epochs, "seed": seed,
               "n_train": summary["n_train"], "n_test": summary["n_test"],
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    (out / RESULTS_MD).write_text(markdown(results))
    if console is not None:
        console.print(f"results: {out / RESULTS_MD}, {out / RESULTS_JSON}", highlight=False,
                      markup=False)
    return results


def _configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipes", nargs="+", metavar="RECIPE|RUN_DIR",
                   help="self-supervised TOML recipes to run, or finished run directories")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs of every recipe (overrides trainer.max_epochs); "
                        "required with recipes")
    p.add_argument("--seed", type=int, default=0, help="training seed of every recipe")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: one run directory per recipe, results.md, "
                        "results.json (with run directories: compare.html)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an entry of every recipe")
    p.add_argument("--allow-imports", action="store_true",
                   help="let the recipes' plugin tables import factories")


def _compare(args: argparse.Namespace, console: Console) -> int:
    """Run self-supervised recipes under one budget and tabulate kNN, probe, RankMe, time."""
    from sdk.cli import UsageError

    dirs = [Path(p).is_dir() for p in args.recipes]
    if all(dirs):
        from sdk.report import compare_report

        page = compare_report(args.recipes, args.out)
        console.print(f"comparison: {page}", highlight=False, markup=False)
        return 0
    if any(dirs):
        raise UsageError("compare takes recipes or run directories, not both")
    if args.epochs is None:
        raise UsageError("--epochs is required when comparing recipes")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    recipes = load_compared(args.recipes, args.epochs, args.seed, args.overrides,
                            allow_imports=args.allow_imports)
    compare_recipes(recipes, out=args.out, epochs=args.epochs, seed=args.seed, console=console)
    return 0


COMMANDS["compare"] = (_configure_compare, _compare)
