"""``paperplug run RECIPE`` and ``paperplug demo``: train, evaluate, calibrate, report.

:func:`run_recipe` is the library form: it builds every plugin of a :class:`~sdk.config.Recipe`,
trains with :class:`~sdk.Trainer`, then measures on the held-out ``test`` split:

* self-supervised recipes: weighted kNN and linear-probe accuracy of the representation and its
  RankMe on the training split, the same for the randomly initialised encoder
  (``random_init_*``) and kNN on the raw inputs;
* supervised recipes (the objective needs logits): accuracy;
* each distribution shift of ``[evaluation] shifts`` (:func:`shift_splits`): the same
  accuracies on the shifted test split, as ``shift/<name>/<metric>``;
* with a ``calibrator``: it is fitted on the held-out ``calibration`` split (on the model's
  logits, or on the linear probe's for self-supervised recipes; on their softmax for a
  calibrator whose ``inputs`` are probabilities) and ECE / NLL are reported before and after
  on ``test``.

The run directory receives ``config.toml`` (the resolved recipe), ``metrics.jsonl``,
``summary.json``, ``training_curves.png``, ``reliability.png``, ``checkpoints/step-*.pt`` (the
newest ``trainer.keep_checkpoints``) and ``inference.pt`` (the fitted calibrator and linear
probe, which :func:`sdk.runs.load_run` reads back with the encoder).

``paperplug export RUN_DIR --format torchscript|state_dict|onnx`` writes the trained encoder
(:func:`sdk.runs.export`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from sdk.cli import COMMANDS

DEMO_RECIPE = "simclr_digits.toml"


def recipes_dir() -> Path:
    """``examples/recipes`` of the source tree paperplug runs from."""
    return Path(__file__).resolve().parent.parent / "examples" / "recipes"


def build(recipe: Any, splits: Any) -> dict[str, Any]:
    """Every plugin of ``recipe`` (errors name the recipe key path), built for ``splits``."""
    from sdk import data
    from sdk.compose import check_composition
    from sdk.config import PluginSpec, build_optimizer, create
    from sdk.context import BuildContext
    from sdk.errors import ConfigError

    context = BuildContext(in_dim=splits.in_dim, num_classes=splits.num_classes,
                           labels=splits.train.y, dataset=splits.train)
    encoder = create(recipe.encoder, "encoder", "encoder", context)
    if not recipe.objectives:
        raise ConfigError("objectives: a recipe needs at least one objective", path="objectives")
    objective = None
    for i, spec in enumerate(recipe.objectives):
        term = create(spec, "objective", f"objectives[{i}]", context)
        weight = spec.weight
        if isinstance(weight, PluginSpec):
            weight = create(weight, "schedule", f"objectives[{i}].weight", context)
        weighted = term if weight == 1.0 and len(recipe.objectives) == 1 else weight * term
        objective = weighted if objective is None else objective + weighted
    if objective.requires.get("logits"):
        out_dim = getattr(encoder, "out_dim", None)
        if out_dim is not None and out_dim != splits.num_classes:
            raise ConfigError(f"encoder.out_dim: the objective needs logits, so the encoder's "
                              f"output must have {splits.num_classes} classes, got {out_dim}",
                              path="encoder.out_dim")

    def optional(name: str, kind: str) -> Any:
        spec = getattr(recipe, name)
        return None if spec is None else create(spec, kind, name, context)

    views = []
    if recipe.data.augment is not None:
        a = recipe.data.augment
        try:
            views.append(data.augmentation(image_shape=splits.image_shape, shift=a.shift,
                                           noise=a.noise, mask=a.mask, scale=a.scale))
        except ConfigError as exc:
            where = f"data.augment.{exc.param}" if exc.param else "data.augment"
            raise ConfigError(f"{where}: {exc}", path=where) from None
    views += [create(s, "transform", f"transforms[{i}]", context)
              for i, s in enumerate(recipe.transforms)]
    transforms = None if not views else views[0] if len(views) == 1 else data.Compose(views)
    need = int(objective.requires.get("views", 1) or 1)
    if transforms is None and need > 1:
        raise ConfigError(f"data.augment: the objective needs {need} views of each sample; give "
                          "data.augment or [[transforms]]", path="data.augment")
    teacher = optional("teacher", "teacher")
    if teacher is not None:
        try:
            check_composition(objective, teacher)
        except ConfigError as exc:
            raise ConfigError(f"teacher: {exc}", path="teacher") from None
    callbacks = [create(s, "callback", f"callbacks[{i}]", context)
                 for i, s in enumerate(recipe.callbacks)]
    readers = [spec.name for spec, c in zip(recipe.callbacks, callbacks)
               if getattr(c, "reads_unlabeled", False)]
    if objective.requires.get("unlabeled"):
        readers.append(objective.name)
    if recipe.data.unlabeled and not readers:
        raise ConfigError("data.unlabeled: nothing in the recipe reads the unlabelled stream; "
                          "give an objective or a callback that learns from unlabelled data "
                          "(e.g. [[callbacks]] name = \"self_training\")", path="data.unlabeled")
    if readers and not recipe.data.unlabeled:
        raise ConfigError(f"data.unlabeled: {', '.join(map(repr, readers))} learns from "
                          f"unlabelled data; set data.unlabeled = true (with label_fraction < 1 "
                          f"or imbalance_ratio > 1, whose left-out samples it is)",
                          path="data.unlabeled")
    calibrator = optional("calibrator", "calibrator")
    if calibrator is not None:
        from sdk.calibration import check_recipe_calibrator

        check_recipe_calibrator(calibrator, supervised=bool(objective.requires.get("logits")),
                                encoder=encoder)
    return {
        "encoder": encoder, "objective": objective, "transforms": transforms,
        "teacher": teacher, "sampler": optional("sampler", "sampler"),
        "reweighter": optional("reweighter", "reweighter"),
        "scheduler": optional("schedule", "schedule"),
        "calibrator": calibrator,
        "callbacks": callbacks,
        "optimizer": build_optimizer(recipe.optimizer),
    }


def make_trainer(recipe: Any, parts: dict[str, Any], *, run_dir: str | Path | None = None,
                 progress: bool | None = None) -> Any:
    """The :class:`~sdk.Trainer` of ``recipe`` (its ``[trainer]`` settings) for the built parts;
    a setting the Trainer rejects raises :class:`~sdk.ConfigError` naming its recipe key."""
    import attrs
    import torch

    from sdk.engine import Trainer
    from sdk.errors import ConfigError

    settings = attrs.asdict(recipe.trainer, recurse=False)
    if settings["device"] != "auto":
        try:
            torch.device(settings["device"])
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"trainer.device: not a torch device: {exc}",
                              path="trainer.device") from None
    try:
        return Trainer(parts["encoder"], parts["objective"], parts["optimizer"],
                       teacher=parts["teacher"], sampler=parts["sampler"],
                       reweighter=parts["reweighter"], transforms=parts["transforms"],
                       callbacks=parts["callbacks"], scheduler=parts["scheduler"],
                       seed=recipe.seed, run_dir=run_dir, progress=progress, **settings)
    except ConfigError as exc:
        key = exc.param or ""
        where = f"trainer.{key}" if key in settings else key if hasattr(recipe, key) else "trainer"
        raise ConfigError(f"{where}: {exc}", param=exc.param, path=where) from None


#: the ``[data]`` keys each source of a user's own data takes, as the reader's parameter names
SOURCE_KEYS = {
    "image_folder": {"path": "path", "image_size": "size", "color": "color", "cache": "cache"},
    "table": {"path": "path", "target": "target", "features": "features",
              "categorical": "categorical"},
    "arrays": {"path": "path", "target": "target", "features": "features"},
}


def source_options(config: Any) -> dict[str, Any]:
    """The reader options of a ``[data]`` table; a source key the named source (or a built-in
    dataset) does not take is a :class:`~sdk.ConfigError` naming it."""
    from sdk.errors import ConfigError

    keys = SOURCE_KEYS.get(config.name, {})
    options = {}
    for key in sorted({k for table in SOURCE_KEYS.values() for k in table}):
        value = getattr(config, key)
        if value is None:
            continue
        if key not in keys:
            takers = [n for n, table in SOURCE_KEYS.items() if key in table]
            raise ConfigError(f"data.{key}: {config.name!r} takes no {key} (only "
                              f"{', '.join(takers)} do)", path=f"data.{key}")
        options[keys[key]] = value
    if "path" in keys and "path" not in options:
        raise ConfigError(f"data.path: the {config.name} source needs the path of the data",
                          path="data.path")
    return options


def load_splits(config: Any) -> Any:
    """The data splits of a recipe's ``[data]`` table; each split must be non-empty."""
    from sdk import data
    from sdk.errors import ConfigError

    if config.calibration_fraction + config.test_fraction >= 1:
        raise ConfigError(f"data.test_fraction: calibration_fraction + test_fraction must be "
                          f"< 1, got {config.calibration_fraction} + {config.test_fraction}",
                          path="data.test_fraction")
    try:
        splits = data.load(config.name, calibration_fraction=config.calibration_fraction,
                           test_fraction=config.test_fraction, seed=config.split_seed,
                           **source_options(config))
    except ConfigError as exc:
        if exc.path:
            raise
        where = f"data.{exc.param}" if exc.param else "data"
        raise ConfigError(f"{where}: {exc}", path=where) from None
    for split, key in (("train", "test_fraction"), ("calibration", "calibration_fraction"),
                       ("test", "test_fraction")):
        if len(getattr(splits, split)) == 0:
            raise ConfigError(f"data.{key}: leaves the {split} split of {config.name!r} empty",
                              path=f"data.{key}")
    try:
        splits = data.reshape_training(
            splits, label_noise=config.label_noise, noise_splits=config.label_noise_splits,
            imbalance_ratio=config.imbalance_ratio, label_fraction=config.label_fraction,
            label_start=config.label_start, seed=config.split_seed)
    except ConfigError as exc:
        raise ConfigError(f"data.{exc.param}: {exc}", path=f"data.{exc.param}") from None
    if config.unlabeled and splits.unlabeled is None:
        raise ConfigError("data.unlabeled: imbalance_ratio and label_fraction leave no training "
                          "sample out, so there is no unlabelled data", path="data.unlabeled")
    return splits


class Prepared(NamedTuple):
    """What a run has before training: the data, the built plugins, the loader, the trainer."""

    splits: Any
    parts: dict[str, Any]
    train_loader: Any
    trainer: Any


def prepare(recipe: Any, *, run_dir: str | Path | None = None,
            progress: bool | None = None, stage: Any = None) -> Prepared:
    """Load the data and build every part of ``recipe`` up to, not including, training (a
    ``stage``, :class:`sdk.stages.StageSetup`, initialises and freezes the encoder first); a bad
    recipe raises :class:`~sdk.ConfigError` naming its key path."""
    from torch.utils.data import DataLoader

    from sdk import checkpoint

    checkpoint.seed_everything(recipe.seed)
    if stage is not None and not stage.train:
        recipe = evaluation_only(recipe)
    cfg = recipe.data
    splits = load_splits(cfg)
    parts = build(recipe, splits)
    if stage is not None:
        parts["stage"] = stage.apply(parts["encoder"])
    train_loader = DataLoader(splits.train, batch_size=cfg.batch_size, shuffle=True,
                              drop_last=cfg.drop_last and len(splits.train) > cfg.batch_size,
                              num_workers=cfg.num_workers)
    trainer = make_trainer(recipe, parts, run_dir=run_dir, progress=progress)
    return Prepared(splits, parts, train_loader, trainer)


def evaluation_only(recipe: Any) -> Any:
    """``recipe`` for a stage that does not train: its trainer only embeds and predicts, so
    it needs no training length."""
    import attrs

    t = recipe.trainer
    if t.max_epochs is None and t.max_steps is None:
        return attrs.evolve(recipe, trainer=attrs.evolve(t, max_steps=1))
    return recipe


def calibrate(calibrator: Any, cal_logits: Any, cal_labels: Any, test_logits: Any,
              cal_features: Any = None, test_features: Any = None) -> Any:
    """Fit ``calibrator`` on the held-out split's logits, their softmax or its features, as its
    ``inputs`` declares (:func:`sdk.calibration.recipe_scores`), and return its calibrated
    probabilities of the test split."""
    import torch

    from sdk.calibration import recipe_scores

    calibrator.fit(recipe_scores(calibrator, cal_logits, cal_features), cal_labels)
    with torch.no_grad():
        return calibrator.predict_proba(recipe_scores(calibrator, test_logits, test_features)).float()


def run(recipe: Any, *, run_dir: str | Path, resume: bool = False,
        progress: bool | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run ``recipe``: its stages in order (:func:`sdk.stages.run_stages`) when it has
    ``[[stages]]``, else one :func:`run_recipe`; returns the summary."""
    if recipe.stages:
        from sdk.stages import run_stages

        return run_stages(recipe, run_dir=run_dir, resume=resume, progress=progress,
                          console=console)
    return run_recipe(recipe, run_dir=run_dir, resume=resume, progress=progress, console=console)


def run_recipe(recipe: Any, *, run_dir: str | Path, resume: bool = False,
               progress: bool | None = None, console: Console | None = None,
               stage: Any = None) -> dict[str, Any]:
    """Train, evaluate and calibrate ``recipe``; returns (and writes) the summary. A ``stage``
    (:class:`sdk.stages.StageSetup`) initialises and freezes the encoder before training, may
    leave training out, and receives the trained encoder at the end."""
    import torch
    from torch.utils.data import DataLoader

    from sdk import metrics
    from sdk.config import dump_toml, unstructure

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = recipe.data
    splits, parts, train_loader, trainer = prepare(recipe, run_dir=run_dir, progress=progress,
                                                   stage=stage)
    supervised = bool(parts["objective"].requires.get("logits"))
    shifted_tests = shift_splits(recipe, splits)

    def ordered(ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=512, shuffle=False, num_workers=cfg.num_workers)

    main = trainer_is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(unstructure(recipe)))
    ev = recipe.evaluation
    use_features = ev.features and callable(getattr(parts["encoder"], "features", None))

    def representation() -> tuple[Any, Any, Any, Any]:
        tr, ytr = trainer.embed(ordered(splits.train), features=use_features, with_targets=True)
        te, yte = trainer.embed(ordered(splits.test), features=use_features, with_targets=True)
        return tr, ytr, te, yte

    def knn(tr: Any, ytr: Any, te: Any, yte: Any) -> float:
        return metrics.knn_accuracy(tr, ytr, te, yte, k=ev.knn_k, temperature=ev.knn_temperature)

    summary: dict[str, Any] = {"recipe": recipe.name, "dataset": cfg.name,
                               "kind": "supervised" if supervised else "self-supervised",
                               "n_train": len(splits.train),
                               "n_calibration": len(splits.calibration),
                               "n_test": len(splits.test), **parts.get("stage", {})}
    if not supervised and ev.random_init:
        rep = representation()
        summary["random_init_knn_accuracy"] = knn(*rep)
        summary["random_init_rankme"] = metrics.rankme(rep[0])
        if ev.linear_probe:
            summary["random_init_linear_probe_accuracy"] = metrics.linear_probe_accuracy(*rep)
        summary["input_knn_accuracy"] = knn(splits.train.x, splits.train.y, splits.test.x,
                                            splits.test.y)
    val_loader = ordered(splits.calibration) if supervised else None
    from sdk.tracking import Tracker

    trackers = [c for c in parts["callbacks"] if isinstance(c, Tracker)]
    for tracker in trackers:  # they end below, with the evaluation in the summary
        tracker.finish_at_fit_end = False
    unlabeled = None
    if cfg.unlabeled:  # the training samples the label fraction and the long tail left out
        unlabeled = DataLoader(splits.unlabeled, batch_size=cfg.unlabeled_batch_size
                               or cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
    if stage is None or stage.train:
        trainer.fit(train_loader, val_loader, resume=resume, unlabeled=unlabeled)
    summary.update({f"train/{k}": v for k, v in getattr(trainer, "summary", {}).items()})

    cal_logits = test_logits = probe = None
    if supervised:
        cal_logits = trainer.predict(ordered(splits.calibration)).float()
        test_logits = trainer.predict(ordered(splits.test)).float()
        test_y = splits.test.y.to(test_logits.device)
        summary["accuracy"] = metrics.accuracy(test_logits.softmax(-1), test_y)
    else:
        tr, ytr, te, yte = rep = representation()
        summary["knn_accuracy"] = knn(*rep)
        summary["rankme"] = metrics.rankme(tr)
        if ev.linear_probe or parts["calibrator"] is not None:
            probe = metrics.fit_linear_probe(tr, ytr, num_classes=splits.num_classes)
            test_logits = probe.logits(te)
            if ev.linear_probe:
                summary["linear_probe_accuracy"] = metrics.accuracy(test_logits, yte)
            if parts["calibrator"] is not None:
                cal_logits = probe.logits(trainer.embed(ordered(splits.calibration),
                                                        features=use_features))
    summary.update(shift_metrics(recipe, shifted_tests, trainer, ordered, supervised=supervised,
                                 features=use_features, probe=probe,
                                 train=None if supervised else (tr, ytr)))
    calibrator = parts["calibrator"]
    if calibrator is not None and cal_logits is not None:
        device = cal_logits.device
        cal_y, test_y = splits.calibration.y.to(device), splits.test.y.to(device)
        cal_feats = test_feats = None
        if calibrator.inputs == "features":  # the representation the class scores come from
            from_features = True if supervised else use_features
            cal_feats = trainer.embed(ordered(splits.calibration), features=from_features)
            test_feats = trainer.embed(ordered(splits.test), features=from_features)
        after = calibrate(calibrator.to(device), cal_logits, cal_y, test_logits, cal_feats,
                          test_feats)
        with torch.no_grad():
            before = test_logits.softmax(-1)
        summary.update(ece_before=metrics.ece(before, test_y), ece_after=metrics.ece(after, test_y),
                       nll_before=metrics.nll(before, test_y), nll_after=metrics.nll(after, test_y),
                       calibrated_accuracy=metrics.accuracy(after, test_y))
        if main:
            try:
                from sdk import plots

                plots.reliability_diagram({"before calibration": (before.cpu(), test_y.cpu()),
                                           f"after {recipe.calibrator.name}":
                                               (after.cpu(), test_y.cpu())},
                                          run_dir / "reliability.png")
            except ImportError:
                pass
    summary["wall_time_s"] = time.perf_counter() - t0
    if main:
        from sdk import checkpoint, runs

        fitted = calibrator if calibrator is not None and cal_logits is not None else None
        checkpoint.save(runs.inference_state(supervised=supervised, features=bool(use_features),
                                             probe=probe, calibrator=fitted),
                        run_dir / runs.INFERENCE)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        for tracker in trackers:
            tracker.finish(summary)
        if console is not None:
            print_summary(summary, console, run_dir)
    if stage is not None:
        stage.finish(parts["encoder"], run_dir, main=main)
    return summary


def shift_splits(recipe: Any, splits: Any) -> dict[str, Any]:
    """The test split under each shift of ``[evaluation] shifts`` (:func:`sdk.data.shifted`,
    seeded by ``data.split_seed``), made before training so a shift the data cannot take is a
    :class:`~sdk.ConfigError` naming its key before anything trains."""
    from sdk import data
    from sdk.errors import ConfigError

    out = {}
    for name, shift in recipe.evaluation.shifts.items():
        try:
            out[name] = data.shifted(splits.test, image_shape=splits.image_shape,
                                     seed=recipe.data.split_seed, shift=shift.shift,
                                     noise=shift.noise, mask=shift.mask, scale=shift.scale)
        except ConfigError as exc:
            where = f"evaluation.shifts.{name}.{exc.param}"
            raise ConfigError(f"{where}: {exc}", path=where) from None
    return out


def shift_metrics(recipe: Any, shifted_tests: dict[str, Any], trainer: Any, ordered: Any, *,
                  supervised: bool, features: bool, probe: Any = None,
                  train: tuple[Any, Any] | None = None) -> dict[str, float]:
    """The test metrics again on each shifted test split (:func:`shift_splits`), as
    ``shift/<name>/<metric>``: ``accuracy`` for supervised recipes; ``knn_accuracy`` against
    the clean training representation ``train`` and, with the fitted ``probe``,
    ``linear_probe_accuracy`` for self-supervised ones."""
    from sdk import metrics

    ev, out = recipe.evaluation, {}
    for name, test in shifted_tests.items():
        key = f"shift/{name}/"
        if supervised:
            logits = trainer.predict(ordered(test)).float()
            out[key + "accuracy"] = metrics.accuracy(logits.softmax(-1), test.y.to(logits.device))
            continue
        te, yte = trainer.embed(ordered(test), features=features, with_targets=True)
        out[key + "knn_accuracy"] = metrics.knn_accuracy(*train, te, yte, k=ev.knn_k,
                                                         temperature=ev.knn_temperature)
        if probe is not None and ev.linear_probe:
            out[key + "linear_probe_accuracy"] = metrics.accuracy(probe.logits(te), yte)
    return out


def trainer_is_main() -> bool:
    from sdk import distributed

    distributed.init()
    return distributed.is_main()


RESULT_KEYS = (
    ("knn_accuracy", "kNN accuracy (test)"),
    ("random_init_knn_accuracy", "kNN accuracy, random-init encoder"),
    ("input_knn_accuracy", "kNN accuracy, raw inputs"),
    ("linear_probe_accuracy", "linear-probe accuracy (test)"),
    ("random_init_linear_probe_accuracy", "linear-probe accuracy, random-init encoder"),
    ("rankme", "RankMe (training split)"),
    ("random_init_rankme", "RankMe, random-init encoder"),
    ("accuracy", "accuracy (test)"),
    ("ece_before", "ECE before calibration"),
    ("ece_after", "ECE after calibration"),
    ("nll_before", "NLL before calibration"),
    ("nll_after", "NLL after calibration"),
    ("train/steps", "optimizer steps"),
    ("train/final_loss", "final training loss"),
    ("wall_time_s", "wall time (s)"),
)


def _title(summary: dict[str, Any]) -> str:
    stage = summary.get("stage")
    return summary["recipe"] if stage is None else f"{summary['recipe']}, stage {stage}"


def print_summary(summary: dict[str, Any], console: Console, run_dir: Path) -> None:
    """The results as a rich table on a terminal; plain ``label: value`` lines when the output
    is not a terminal or ``CI`` is set."""
    rows = [(label, f"{summary[key]:.4f}" if isinstance(summary[key], float) else str(summary[key]))
            for key, label in RESULT_KEYS if key in summary]
    rows += [(key, f"{value:.4f}") for key, value in summary.items() if key.startswith("shift/")]
    if not console.is_terminal or os.environ.get("CI"):
        text = {"highlight": False, "markup": False, "soft_wrap": True}
        console.print(f"{_title(summary)} on {summary['dataset']} ({summary['kind']}, "
                      f"{summary['n_test']} held-out test samples)", **text)
        for label, value in rows:
            console.print(f"{label}: {value}", **text)
        console.print(f"run directory: {run_dir}", **text)
        return
    table = Table(title=f"{_title(summary)} on {summary['dataset']} "
                        f"({summary['kind']}, {summary['n_test']} held-out test samples)")
    table.add_column("result")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    console.print(f"run directory: {run_dir}")


def trainer_settings_help() -> str:
    """The ``[trainer]`` settings, one line each (name, type, default, constraints, doc)."""
    import annotated_types
    import attrs

    from sdk.config import TrainerConfig
    from sdk.constraints import describe

    rows = []
    for f in attrs.fields(TrainerConfig):
        bounds = ", ".join(describe(c) for c in f.metadata["constraints"]
                           if not isinstance(c, annotated_types.Predicate))
        type_name = f.type.__name__ if isinstance(f.type, type) else str(f.type)
        kind = f"{type_name}{f' ({bounds})' if bounds else ''}, default {f.default!r}"
        rows.append((f"trainer.{f.name}", kind, f.metadata["doc"]))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"  {name:<{width[0]}}  {kind:<{width[1]}}  {doc}" for name, kind, doc in rows]
    return "trainer settings (--set trainer.NAME=VALUE):\n" + "\n".join(lines)


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = trainer_settings_help()
    p.add_argument("recipe", nargs="?", help="TOML recipe (optional with --resume: the run's "
                                              "config.toml is used)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<name>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set trainer.max_epochs=5 "
                        "--set objectives[0].temperature=0.2 (trainer settings below)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its newest valid checkpoint")
    p.add_argument("--allow-imports", action="store_true",
                   help="let the recipe's plugin tables import factories (module = "
                        "\"package.module:factory\"); off: only registered plugins")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=V1,V2",
                   help="run the recipe at each value of KEY (repeat for a grid; adds to or "
                        "replaces the recipe's [sweep] table), each point in RUN_DIR/KEY=VALUE, "
                        "then write sweep.csv, sweep.json and sweep.png there")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="sweep points run at once, in processes (default: one per CPU core)")
    p.add_argument("--metric", default=None,
                   help="the summary number sweep.png plots (default: accuracy, else "
                        "linear_probe_accuracy, else knn_accuracy)")


def _run(args: argparse.Namespace, console: Console) -> int:
    """Train, evaluate and calibrate a TOML recipe."""
    from sdk import sweep
    from sdk.cli import UsageError
    from sdk.config import load_recipe

    if args.recipe is None and args.resume is None:
        raise UsageError("give a RECIPE or --resume DIR")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.recipe is not None and args.resume is None:
        swept = sweep.points(args.recipe, args.overrides, args.sweeps,
                             allow_imports=args.allow_imports)
        if swept:
            out = args.run_dir or default_run_dir(f"{swept[0].recipe.name}-sweep")
            sweep.run_sweep(swept, out, jobs=args.jobs, metric=args.metric,
                            allow_imports=args.allow_imports, console=console)
            return 0
    elif args.sweeps:
        raise UsageError("--sweep goes with a RECIPE; to resume a sweep, run it again with "
                         "the same --run-dir")
    source = args.recipe or Path(args.resume) / "config.toml"
    recipe = load_recipe(source, args.overrides, allow_imports=args.allow_imports)
    run_dir = args.resume or args.run_dir or default_run_dir(recipe.name)
    run(recipe, run_dir=run_dir, resume=args.resume is not None, console=console)
    return 0


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None, help="output directory (default runs/demo-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an entry of the demo recipe")


def _demo(args: argparse.Namespace, console: Console) -> int:
    """Self-supervised SimCLR on scikit-learn digits (about a minute on 2 CPU cores)."""
    from sdk.cli import UsageError
    from sdk.config import load_recipe

    path = recipes_dir() / DEMO_RECIPE
    if not path.exists():
        raise UsageError(f"the demo recipe {path} is missing; run the demo from a source "
                         "checkout of paperplug")
    recipe = load_recipe(path, args.overrides)
    console.print(f"[bold]paperplug demo[/bold]: {recipe.name} ({path})")
    run_recipe(recipe, run_dir=args.run_dir or default_run_dir("demo"), console=console)
    return 0


def _configure_export(p: argparse.ArgumentParser) -> None:
    from sdk.runs import FORMATS

    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'paperplug run'")
    p.add_argument("--format", choices=FORMATS, default="torchscript",
                   help="torchscript (traced), state_dict (torch.load(weights_only=True)) or "
                        "onnx (needs the onnx package); default torchscript")
    p.add_argument("--output", "-o", default=None,
                   help="file to write (default RUN_DIR/encoder.ts.pt, .pt or .onnx)")
    p.add_argument("--features", action="store_true",
                   help="export the backbone's features (encoder.features) instead of its output")
    p.add_argument("--allow-imports", action="store_true",
                   help="let the run's recipe import factories (as 'paperplug run' does)")


def _export(args: argparse.Namespace, console: Console) -> int:
    """Write a run's trained encoder as TorchScript, a state_dict or ONNX."""
    from sdk.runs import export, load_run

    run = load_run(args.run_dir, allow_imports=args.allow_imports)
    path = export(run, args.format, args.output, features=args.features)
    what = "encoder features" if args.features else "encoder"
    console.print(f"{what} of {args.run_dir} (step {run.step}, {run.checkpoint.name}) written "
                  f"as {args.format}: {path}", highlight=False, markup=False, soft_wrap=True)
    return 0


COMMANDS["run"] = (_configure_run, _run)
def _configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'paperplug run'")
    p.add_argument("--output", "-o", default=None,
                   help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--allow-imports", action="store_true",
                   help="let the run's recipe import factories (as 'paperplug run' does)")


def _write_report(args: argparse.Namespace, console: Console) -> int:
    """Write a run's self-contained HTML report (curves, calibration, classes, embeddings)."""
    from sdk.report import run_report

    path = run_report(args.run_dir, args.output, allow_imports=args.allow_imports)
    console.print(f"report: {path}", highlight=False, markup=False)
    return 0


COMMANDS["export"] = (_configure_export, _export)
COMMANDS["report"] = (_configure_report, _write_report)
COMMANDS["demo"] = (_configure_demo, _demo)
