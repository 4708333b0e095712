"""Stages: one recipe run as a chain of runs (pretrain -> fine-tune -> calibrate -> evaluate).

A recipe with ``[[stages]]`` tables runs each stage in order. A stage is the top-level recipe
with the stage's keys laid over it: plugin tables and arrays the stage gives (``encoder``,
``[[objectives]]``, ``calibrator``, ``sampler``, ``[[transforms]]``, ...) replace the top-level
ones; the tables ``data``, ``optimizer``, ``trainer`` and ``evaluation`` are updated key by key.
Its own keys are::

    [[stages]]
    name = "finetune"          # required, unique: the stage's directory RUN_DIR/finetune
    init = "previous"          # the stage whose trained encoder this one starts from: the
                               # previous one (default), an earlier one by name, or "none"
    init_keys = ["backbone"]   # parameter-name prefixes copied (default: all); only the
                               # parameters and buffers with the same name and shape are
    freeze = ["backbone"]      # encoder parameter-name prefixes kept fixed (requires_grad off;
                               # buffers such as batch-norm statistics still update)
    train = true               # false: evaluate (and calibrate) the initialised encoder only

Each stage is an ordinary run (:func:`sdk.cli_run.run_recipe`) in ``RUN_DIR/<stage>/``, which
also receives ``encoder.pt``, the stage's final encoder state (written last: its presence marks
the stage finished). ``RUN_DIR/config.toml`` holds the whole recipe and ``RUN_DIR/summary.json``
every finished stage's numbers as ``"<stage>/<key>"``, the last stage's also unprefixed.
Every stage is built (its data, plugins, initialisation and frozen parts checked, errors naming
the key path ``stages[1].freeze[0]``) before the first one trains. Resuming (``paperplug run
--resume RUN_DIR``, or running a sweep again) skips finished stages and continues the stage that
stopped from its newest checkpoint.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from cattrs.errors import ClassValidationError

from sdk.config import _run_name
from sdk.errors import ConfigError

ENCODER = "encoder.pt"
SUMMARY = "summary.json"
OWN_KEYS = ("name", "init", "init_keys", "freeze", "train")
MERGED = ("data", "optimizer", "trainer", "evaluation")
"""The tables a stage updates key by key; every other key it gives replaces the top level's."""


@attrs.define(kw_only=True)
class StageOptions:
    """A stage's own keys (see the module docstring)."""

    name: str = attrs.field(validator=_run_name)
    init: str = "previous"
    init_keys: list[str] = attrs.Factory(list)
    freeze: list[str] = attrs.Factory(list)
    train: bool = True


@attrs.frozen
class Stage:
    """One stage: its options, the recipe it runs (top level + its keys) and its table as
    given (what ``config.toml`` writes back)."""

    options: StageOptions
    recipe: Any
    table: dict[str, Any]


def merged(top: Mapping[str, Any], table: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe data of a stage: ``top`` (without its stages and sweep) with ``table`` laid
    over it (see :data:`MERGED`)."""
    out = {k: copy.deepcopy(v) for k, v in top.items() if k not in ("stages", "sweep")}
    for key, value in table.items():
        if key in OWN_KEYS:
            continue
        if key in MERGED and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **copy.deepcopy(dict(value))}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _in_stage(exc: ConfigError, index: int, name: str, table: Mapping[str, Any]) -> ConfigError:
    """``exc`` of a stage's recipe, naming the key where the stage or the top level gives it."""
    path, text = exc.path or "", str(exc)
    head, *rest = re.split(r"[.\[]", path, maxsplit=2)
    given = head in table and head not in OWN_KEYS and (head not in MERGED or not rest
                               or not isinstance(table[head], Mapping) or rest[0] in table[head])
    if path and given:
        where = f"stages[{index}].{path}"
        rest = text[len(path) + 2:] if text.startswith(f"{path}: ") else text
        return ConfigError(f"{where}: {rest}", path=where)
    return ConfigError(f"{text} (in stage {name!r})", path=path or f"stages[{index}]")


def structure_stages(data: Mapping[str, Any], *, allow_imports: bool = False
                     ) -> tuple[dict[str, Any], list[Stage]]:
    """The top-level data a staged recipe's own :class:`~sdk.config.Recipe` is made of, and its
    stages, each structured and checked (errors name the key path)."""
    from sdk.config import CONVERTER, Recipe, _cattrs_errors, structure

    tables = data["stages"]
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError("stages: expected an array of tables ([[stages]])", path="stages")
    if not tables:
        raise ConfigError("stages: give at least one [[stages]] table", path="stages")
    top = {k: v for k, v in data.items() if k != "stages"}
    stages: list[Stage] = []
    accepted = [*OWN_KEYS, *(f.name for f in attrs.fields(Recipe) if f.name not in
                             ("name", "stages"))]
    for i, table in enumerate(tables):
        for key in table:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"stages[{i}].{key}: unknown key{hint}; a stage takes "
                                  f"{', '.join(accepted)}", path=f"stages[{i}].{key}")
        own = {k: table[k] for k in OWN_KEYS if k in table}
        try:
            options = CONVERTER.structure(own, StageOptions)
        except ClassValidationError as exc:
            err = _cattrs_errors(exc)
            rest = str(err)[len(err.path) + 2:]  # "<key>: <message>"
            raise ConfigError(f"stages[{i}].{err.path}: {rest}", path=f"stages[{i}].{err.path}"
                              ) from None
        names = [s.options.name for s in stages]
        if options.name in names:
            raise ConfigError(f"stages[{i}].name: {options.name!r} is the name of stages"
                              f"[{names.index(options.name)}] too; stage names are directories "
                              f"and must differ", path=f"stages[{i}].name")
        if options.init not in ("previous", "none", *names):
            raise ConfigError(f"stages[{i}].init: expected \"previous\", \"none\" or the name of "
                              f"an earlier stage ({', '.join(map(repr, names)) or 'none here'}), "
                              f"got {options.init!r}", path=f"stages[{i}].init")
        if options.init_keys and _source(options, i, names) is None:
            raise ConfigError(f"stages[{i}].init_keys: the stage starts from a fresh encoder "
                              f"(init = {options.init!r}), so there is nothing to copy",
                              path=f"stages[{i}].init_keys")
        body = merged(top, table)
        if not body.get("objectives"):
            raise ConfigError(f"stages[{i}].objectives: required key is missing (give the "
                              f"stage's [[stages.objectives]] or top-level [[objectives]])",
                              path=f"stages[{i}].objectives")
        try:
            recipe = structure(body, allow_imports=allow_imports)
        except ConfigError as exc:
            raise _in_stage(exc, i, options.name, table) from None
        stages.append(Stage(options=options, recipe=recipe, table=dict(table)))
    top.setdefault("objectives", [])
    if "encoder" not in top:  # every stage gives its own
        top["encoder"] = copy.deepcopy(tables[0]["encoder"])
    return top, stages


def _source(options: StageOptions, index: int, names: Sequence[str]) -> str | None:
    """The name of the stage whose encoder stage ``index`` starts from, or None (fresh)."""
    if options.init == "none" or (options.init == "previous" and index == 0):
        return None
    return names[index - 1] if options.init == "previous" else options.init


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def _top_names(encoder: Any) -> str:
    return ", ".join(n for n, _ in encoder.named_children()) or "(no submodules)"


@attrs.define
class StageSetup:
    """What :func:`sdk.cli_run.run_recipe` does for a stage: initialise and freeze the built
    encoder (:meth:`apply`), train or not, and write ``encoder.pt`` when done (:meth:`finish`)."""

    stage: Stage
    index: int
    source: str | None = None
    state: Mapping[str, Any] | None = None
    trained: dict[str, Any] | None = None

    @property
    def train(self) -> bool:
        return self.stage.options.train

    def apply(self, encoder: Any) -> dict[str, Any]:
        """Copy the source stage's encoder state into ``encoder`` and freeze the named parts;
        the summary entries saying what was done."""
        info: dict[str, Any] = {"stage": self.stage.options.name}
        opts, where = self.stage.options, f"stages[{self.index}]"
        if self.state is not None:
            copied, skipped = initialise(encoder, self.state, opts.init_keys, where=where,
                                         source=self.source)
            info.update({"init_from": self.source, "init_copied": len(copied)})
            if skipped:
                info["init_skipped"] = ", ".join(skipped)
        frozen = freeze(encoder, opts.freeze, where=where)
        if frozen:
            info["frozen_parameters"] = frozen
        return info

    def finish(self, encoder: Any, run_dir: Path, *, main: bool = True) -> None:
        """Keep the trained encoder's state (:attr:`trained`) and, on the main process, write
        it to ``run_dir/encoder.pt``."""
        from sdk import checkpoint

        self.trained = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        if main:
            checkpoint.save(self.trained, Path(run_dir) / ENCODER)


def initialise(encoder: Any, state: Mapping[str, Any], keys: Sequence[str], *, where: str,
               source: str | None) -> tuple[list[str], list[str]]:
    """Load the entries of ``state`` (restricted to the prefixes ``keys`` when given) whose
    name and shape match ``encoder``'s; returns the copied names and those skipped for their
    shape. A prefix matching nothing, or nothing copied, is a :class:`~sdk.ConfigError`."""
    own = encoder.state_dict()
    for j, prefix in enumerate(keys):
        if not any(_matches(n, [prefix]) for n in own):
            raise ConfigError(f"{where}.init_keys[{j}]: {prefix!r} names no parameter of the "
                              f"stage's encoder (its parts: {_top_names(encoder)})",
                              path=f"{where}.init_keys[{j}]")
        if not any(_matches(n, [prefix]) for n in state):
            raise ConfigError(f"{where}.init_keys[{j}]: {prefix!r} names no parameter of stage "
                              f"{source!r}'s encoder", path=f"{where}.init_keys[{j}]")
    chosen = [n for n in state if n in own and (not keys or _matches(n, keys))]
    copied = [n for n in chosen if tuple(state[n].shape) == tuple(own[n].shape)]
    skipped = [n for n in chosen if n not in copied]
    if not copied:
        raise ConfigError(f"{where}.init: no parameter of stage {source!r}'s encoder has the "
                          f"name and shape of one of this stage's (give the stages the same "
                          f"backbone, or init = \"none\")", path=f"{where}.init")
    encoder.load_state_dict({n: state[n] for n in copied}, strict=False)
    return copied, skipped


def freeze(encoder: Any, prefixes: Sequence[str], *, where: str) -> int:
    """Turn off ``requires_grad`` of the encoder parameters under ``prefixes``; the number of
    tensors frozen. A prefix naming no parameter is a :class:`~sdk.ConfigError`."""
    params = dict(encoder.named_parameters())
    count = 0
    for j, prefix in enumerate(prefixes):
        hit = [p for n, p in params.items() if _matches(n, [prefix])]
        if not hit:
            raise ConfigError(f"{where}.freeze[{j}]: {prefix!r} names no parameter of the "
                              f"stage's encoder (its parts: {_top_names(encoder)})",
                              path=f"{where}.freeze[{j}]")
        for p in hit:
            count += p.requires_grad
            p.requires_grad_(False)
    return count


def check(recipe: Any) -> None:
    """Build every stage (data, plugins, initialisation, frozen parts) before any trains, so
    that a bad later stage fails at once with its key path."""
    from sdk.cli_run import build, evaluation_only, load_splits, make_trainer

    encoders: dict[str, Any] = {}
    names = [s.options.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        body = stage.recipe if stage.options.train else evaluation_only(stage.recipe)
        try:
            parts = build(body, load_splits(body.data))
            make_trainer(body, parts, progress=False)
        except ConfigError as exc:
            raise _in_stage(exc, i, stage.options.name, stage.table) from None
        encoder = parts["encoder"]
        setup = StageSetup(stage, i, _source(stage.options, i, names))
        if setup.source is not None:
            setup.state = encoders[setup.source].state_dict()
        setup.apply(encoder)
        trainable = [p for m in (encoder, parts["objective"]) for p in m.parameters()
                     if p.requires_grad]
        if stage.options.train and not trainable:
            raise ConfigError(f"stages[{i}].freeze: leaves nothing to train; give train = "
                              f"false to only evaluate the stage", path=f"stages[{i}].freeze")
        encoders[stage.options.name] = encoder


def run_stages(recipe: Any, *, run_dir: str | Path, resume: bool = False,
               progress: bool | None = None, console: Any = None) -> dict[str, Any]:
    """Run every stage of ``recipe`` in ``run_dir`` (see the module docstring); with
    ``resume``, finished stages are read back and the one that stopped continues."""
    from sdk import checkpoint
    from sdk.cli_run import run_recipe, trainer_is_main
    from sdk.config import dump_toml, unstructure

    run_dir = Path(run_dir)
    check(recipe)
    main = trainer_is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(unstructure(recipe)))
    names = [s.options.name for s in recipe.stages]
    states: dict[str, Any] = {}
    prefixed: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for i, stage in enumerate(recipe.stages):
        name, stage_dir = stage.options.name, run_dir / stage.options.name
        finished = (stage_dir / ENCODER).is_file() and (stage_dir / SUMMARY).is_file()
        if resume and finished:
            states[name] = checkpoint.load(stage_dir / ENCODER)
            result = json.loads((stage_dir / SUMMARY).read_text())
            if console is not None:
                console.print(f"stage {name}: finished before ({stage_dir})", highlight=False,
                              markup=False)
        else:
            source = _source(stage.options, i, names)
            setup = StageSetup(stage, i, source, None if source is None else states[source])
            if console is not None:
                console.print(f"stage {i + 1}/{len(names)}: {name}", highlight=False,
                              markup=False)
            result = run_recipe(stage.recipe, run_dir=stage_dir, progress=progress,
                                console=console, stage=setup,
                                resume=resume and (stage_dir / "checkpoints").is_dir())
            states[name] = setup.trained
        result = {k: v for k, v in result.items() if _flat(v)}
        prefixed.update({f"{name}/{k}": v for k, v in result.items() if k not in ("recipe", "stage")})
        summary = {**result, "recipe": recipe.name, "stages": names[:i + 1], **prefixed}
        if main:
            (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def _flat(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None
