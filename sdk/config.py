"""TOML recipes: parsed with tomllib, structured into attrs configs with cattrs, built into plugins.

A recipe names every part of a run; each plugin is a table with ``name`` and its parameters
(nested tables with a ``name`` are plugins too, their kind read from the parameter's type)::

    name = "simclr_digits"
    seed = 0
    [data]            # sdk.data.load + the view augmentation
    name = "digits"
    batch_size = 256
    augment = { shift = 1, noise = 0.1, mask = 0.2 }
    [encoder]
    name = "projection_head"
    out_dim = 64
    [encoder.backbone]
    name = "mlp"
    hidden_dims = [256]
    [[objectives]]    # summed: weight * objective (weight: number or a schedule table)
    name = "nt_xent"
    temperature = 0.5
    [optimizer]       # any torch.optim class by (case-insensitive) name
    name = "adamw"
    lr = 1e-3
    [trainer]         # sdk.Trainer arguments
    max_epochs = 100

Optional tables: ``sampler``, ``reweighter``, ``teacher``, ``schedule`` (an LR multiplier),
``calibrator``, ``[[transforms]]``, ``[[callbacks]]``, ``evaluation``. Errors name the key
path: ``objectives[1].lambd: expected float, got "x"``.

**Imports.** A recipe names registered plugins, ``torch.optim`` optimizers and built-in
datasets only: it cannot make paperplug import a Python object, so running a recipe someone
sent you runs no code of theirs. A plugin table may instead give ``module =
"package.module:factory"`` (the factory is imported and called with the table's parameters,
and must return a plugin of the slot's kind) only when the user opts in: ``paperplug run
--allow-imports`` or ``load_recipe(..., allow_imports=True)``. Without the opt-in such a table,
or a ``name`` spelled as an import reference (``"os:system"``), is a ConfigError naming the key.

Parameters a recipe cannot spell are filled from the data when the plugin marks them with
:class:`sdk.context.FromData` and the recipe leaves them out (``in_dim``, ``num_classes``,
``labels``, ``dataset``).

:class:`TrainerConfig` is the one declaration of the trainer's settings (types, defaults,
constraints, one-line docs): the ``[trainer]`` table, the keyword arguments of
:class:`sdk.Trainer` and the settings ``paperplug run --help`` lists are all read from it.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import inspect
import json
import math
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import annotated_types
import attrs
import cattrs
import cattrs.cols
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from sdk import constraints
from sdk.card import KINDS
from sdk.context import BuildContext, data_params
from sdk.errors import ConfigError, PluginError

# configs ------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class PluginSpec:
    """A plugin: its ``name``, optional explicit ``kind``, and parameters (nested specs allowed);
    ``module`` (``"package.module:factory"``, also its ``name``) when it is imported instead."""

    name: str
    params: dict[str, Any] = attrs.Factory(dict)
    kind: str | None = None
    module: str | None = None


@attrs.define(kw_only=True)
class ObjectiveSpec(PluginSpec):
    """An objective term and its weight (a number, or a schedule plugin of the step)."""

    weight: float | PluginSpec = 1.0


class _SettingError(ConfigError):
    """A recipe setting outside its constraints: ``"<name> <reason>"``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} {reason}", param=name)
        self.reason = reason


def _check_setting(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    for constraint in attribute.metadata["constraints"]:
        if value is not None and not constraints.holds(constraint, value):
            raise _SettingError(attribute.name, f"must be {constraints.describe(constraint)}, "
                                                f"got {_show(value)}")


def _declared(given: tuple[Any, ...]) -> tuple[Any, ...]:
    """annotated-types constraints, a tuple of allowed values becoming ``one_of`` it."""
    return tuple(constraints.one_of(c) if isinstance(c, tuple) else c for c in given)


def setting(default: Any, doc: str, *given: Any) -> Any:
    """A :class:`TrainerConfig` field: default, one-line doc and constraints, each an
    annotated-types bound (``Ge(1)``, ``Gt(0)``, ...) or a tuple of allowed values; checked
    and described by :mod:`sdk.constraints`, as plugin parameters are."""
    return attrs.field(default=default, validator=_check_setting,
                       metadata={"doc": doc, "constraints": _declared(given)})


def checked(default: Any, *given: Any) -> Any:
    """A recipe field whose value must satisfy the constraints ``given`` (as in
    :func:`setting`); NaN satisfies no bound."""
    return attrs.field(default=default, validator=_check_setting,
                       metadata={"constraints": _declared(given)})


_Ge, _Gt, _Le, _Lt = annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt


@attrs.define(kw_only=True)
class AugmentConfig:
    """The view generator (:func:`sdk.data.augmentation`); all off by default."""

    shift: int = checked(0, _Ge(0))
    noise: float = checked(0.0, _Ge(0), _Lt(math.inf))
    mask: float = checked(0.0, _Ge(0), _Lt(1))
    scale: float = checked(0.0, _Ge(0), _Lt(1))


@attrs.define(kw_only=True)
class DataConfig:
    name: str = "digits"
    batch_size: int = checked(256, _Ge(1))
    calibration_fraction: float = checked(0.2, _Ge(0), _Lt(1))
    test_fraction: float = checked(0.2, _Ge(0), _Lt(1))
    split_seed: int = 0
    num_workers: int = checked(0, _Ge(0))
    drop_last: bool = True
    augment: AugmentConfig | None = None
    # the training split (sdk.data.reshape_training)
    label_fraction: float = checked(1.0, _Gt(0), _Le(1))
    label_start: float = checked(0.0, _Ge(0), _Lt(1))
    imbalance_ratio: float = checked(1.0, _Ge(1), _Lt(math.inf))
    label_noise: float = checked(0.0, _Ge(0), _Lt(1))
    label_noise_splits: list[str] = attrs.Factory(lambda: ["train"])
    unlabeled: bool = False
    unlabeled_batch_size: int | None = checked(None, _Ge(1))
    # a user's own data, for name = "image_folder", "table" or "arrays" (sdk.datasources)
    path: str | None = None
    target: str | None = None
    features: list[str] | None = None
    categorical: list[str] | None = None
    image_size: list[int] | None = None
    color: str | None = None
    cache: bool | None = None


@attrs.define(kw_only=True)
class OptimizerConfig:
    """``torch.optim.<name>(params, lr=lr, weight_decay=weight_decay, **options)``."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    options: dict[str, Any] = attrs.Factory(dict)


PRECISIONS = ("32", "bf16-mixed", "fp16-mixed")
NONFINITE = ("raise", "skip")


@attrs.define(kw_only=True)
class TrainerConfig:
    """The scalar settings of :class:`sdk.Trainer` (its keyword arguments after the plugins)."""

    max_epochs: int | None = setting(
        None, "epochs to train (give max_epochs, max_steps or both)", annotated_types.Ge(1))
    max_steps: int | None = setting(
        None, "optimizer steps to train; the run ends at whichever limit comes first",
        annotated_types.Ge(1))
    precision: str = setting("32", '"32", "bf16-mixed" or "fp16-mixed" (CUDA only)', PRECISIONS)
    accumulate: int = setting(1, "micro-batches per optimizer step", annotated_types.Ge(1))
    clip_grad_norm: float | None = setting(
        None, "clip the global gradient norm to this value", annotated_types.Gt(0))
    device: str = setting("auto", '"auto" (CUDA when available), "cpu", "cuda:1", ...')
    compile: bool = setting(False, "torch.compile the forward pass")
    log_every: int = setting(50, "optimizer steps between logged training records",
                             annotated_types.Ge(1))
    checkpoint_every: int | None = setting(
        None, "optimizer steps between checkpoints (a checkpoint is also written at every "
              "epoch end)", annotated_types.Ge(1))
    on_nonfinite: str = setting(
        "raise", '"raise" (stop at the next log point or checkpoint, naming the step, the '
                 'objective terms and the last good checkpoint) or "skip" (drop an update whose '
                 'loss or gradient is not finite, and count it)', NONFINITE)
    keep_checkpoints: int = setting(
        3, "checkpoints kept in run_dir/checkpoints (the newest; a resume falls back to an "
           "older one when the newest is damaged)", annotated_types.Ge(1))


attrs.resolve_types(TrainerConfig)  # field types as objects, as cattrs and signatures read them


def trainer_config(values: Mapping[str, Any]) -> TrainerConfig:
    """``values`` checked like a recipe's ``[trainer]`` table (types, constraints, unknown
    names with the closest suggestion); the error names the setting."""
    try:
        return CONVERTER.structure(dict(values), TrainerConfig)
    except ClassValidationError as exc:
        err = _cattrs_errors(exc, "invalid trainer settings")
        raise ConfigError(str(err), param=err.path, path=err.path) from None


def with_trainer_settings(init: Any) -> Any:
    """Give ``init``, which takes ``**settings``, a signature listing the TrainerConfig fields
    as keyword-only parameters (what ``help`` and IDEs show)."""
    sig = inspect.signature(init)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for f in attrs.fields(TrainerConfig)]
    init.__signature__ = sig.replace(parameters=params)
    return init


def _check_shifts(instance: Any, attribute: attrs.Attribute, value: dict[str, Any]) -> None:
    for name, shift in value.items():
        if not any(attrs.astuple(shift)):
            raise _SettingError(f"{attribute.name}.{name}", "must change the test inputs: give "
                                "shift, noise, mask or scale")


@attrs.define(kw_only=True)
class EvaluationConfig:
    """How a run is measured: kNN (weighted, InstDisc) and linear probe on the representation
    (backbone features when the encoder has them and ``features`` is true); ``shifts`` names
    distribution shifts of the test split (:func:`sdk.data.shifted`), each measured again as
    ``shift/<name>/<metric>``."""

    knn_k: int = checked(20, _Ge(1))
    knn_temperature: float = checked(0.07, _Gt(0), _Lt(math.inf))
    linear_probe: bool = True
    features: bool = True
    random_init: bool = True
    shifts: dict[str, AugmentConfig] = attrs.field(factory=dict, validator=_check_shifts)


def _run_name(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value in ("", ".", "..") or re.search(r"[/\\\x00-\x1f\x7f]", value):
        raise _SettingError(attribute.name, f"must be usable as a directory name (no path "
                                            f"separators or control characters), got "
                                            f"{_show(value)}")


@attrs.define(kw_only=True)
class Recipe:
    name: str = attrs.field(default="recipe", validator=_run_name)
    seed: int = 0
    data: DataConfig = attrs.Factory(DataConfig)
    encoder: PluginSpec
    objectives: list[ObjectiveSpec]
    sampler: PluginSpec | None = None
    reweighter: PluginSpec | None = None
    teacher: PluginSpec | None = None
    schedule: PluginSpec | None = None
    calibrator: PluginSpec | None = None
    transforms: list[PluginSpec] = attrs.Factory(list)
    callbacks: list[PluginSpec] = attrs.Factory(list)
    optimizer: OptimizerConfig = attrs.Factory(OptimizerConfig)
    trainer: TrainerConfig = attrs.Factory(TrainerConfig)
    evaluation: EvaluationConfig = attrs.Factory(EvaluationConfig)
    stages: list[Any] = attrs.Factory(list)
    """The :class:`sdk.stages.Stage` list of a recipe with ``[[stages]]`` (empty otherwise)."""


# structuring --------------------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # not JSON, or an int too long to print
        return f"<{type(value).__name__}>"


def _strict(kind: type, accept: tuple[type, ...]) -> Any:
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, bool) and kind is not bool or not isinstance(value, accept):
            raise TypeError(f"expected {kind.__name__}, got {_show(value)}")
        return kind(value)
    return hook


def _plugin_spec(value: Any, cls: type) -> PluginSpec:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a plugin table with a 'name', got {_show(value)}")
    if "name" in value and "module" in value:
        raise _KeyError("module", "give name (a registered plugin) or module (an import), not both")
    module = value.get("module")
    if module is not None and not (isinstance(module, str) and _REFERENCE.fullmatch(module)):
        raise _KeyError("module", f"expected \"package.module:factory\", got {_show(module)}")
    if "name" not in value and module is None:
        raise _KeyError("name", "required key is missing (a plugin table needs name = "
                                "\"<plugin name>\")")
    for key in ("name", "kind"):
        if key in value and not isinstance(value[key], str):
            raise _KeyError(key, f"expected str, got {_show(value[key])}")
    rest = dict(value)
    rest.pop("module", None)
    name, kind = rest.pop("name", module), rest.pop("kind", None)
    extra: dict[str, Any] = {}
    if cls is ObjectiveSpec and "weight" in rest:
        weight = rest.pop("weight")
        if isinstance(weight, Mapping):
            extra["weight"] = _sub_spec("weight", weight)
        elif (isinstance(weight, (int, float)) and not isinstance(weight, bool)
              and math.isfinite(weight)):
            extra["weight"] = float(weight)
        else:
            raise _KeyError("weight", f"expected a finite number or a schedule table, got "
                                      f"{_show(weight)}")
    return cls(name=name, kind=kind, module=module,
               params={k: _nested(k, v) for k, v in rest.items()}, **extra)


def _is_plugin_table(value: Any) -> bool:
    return isinstance(value, Mapping) and ("name" in value or "module" in value)


def _sub_spec(key: str, value: Any) -> PluginSpec:
    """A plugin table nested at ``key``; its errors name the key under ``key``."""
    try:
        return _plugin_spec(value, PluginSpec)
    except _KeyError as exc:
        raise _KeyError(f"{key}.{exc.key}", str(exc)) from None


def _nested(key: str, value: Any) -> Any:
    if _is_plugin_table(value):
        return _sub_spec(key, value)
    if isinstance(value, list) and value and all(_is_plugin_table(v) for v in value):
        return [_sub_spec(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return value


def _unstructure_spec(spec: PluginSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"module": spec.module} if spec.module else {"name": spec.name}
    if spec.kind is not None:
        out["kind"] = spec.kind
    if isinstance(spec, ObjectiveSpec):
        out["weight"] = (spec.weight if not isinstance(spec.weight, PluginSpec)
                         else _unstructure_spec(spec.weight))
    for key, value in spec.params.items():
        if isinstance(value, PluginSpec):
            value = _unstructure_spec(value)
        elif isinstance(value, list) and value and isinstance(value[0], PluginSpec):
            value = [_unstructure_spec(v) for v in value]
        out[key] = value
    return out


class _KeyError(TypeError):
    """An error about the entry ``key`` of the table being structured."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _table(cls: type, conv: cattrs.Converter) -> Any:
    inner = make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True)

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table, got {_show(value)}")
        return inner(value, cls)
    return hook


def _is_list(type_: Any) -> bool:
    return typing.get_origin(type_) is list


def _is_dict(type_: Any) -> bool:
    return typing.get_origin(type_) is dict


def _array(type_: Any, conv: cattrs.Converter) -> Any:
    inner = cattrs.cols.list_structure_factory(type_, conv)
    element = typing.get_args(type_)[0] if typing.get_args(type_) else Any
    what = "an array of tables" if attrs.has(element) else "an array"

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {what}, got {_show(value)}")
        return inner(value, type_)
    return hook


def _mapping(type_: Any, conv: cattrs.Converter) -> Any:
    inner = cattrs.cols.mapping_structure_factory(type_, conv)

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table, got {_show(value)}")
        return inner(value, type_)
    return hook


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_factory(_is_list, _array)
    conv.register_structure_hook_factory(_is_dict, _mapping)
    conv.register_structure_hook(int, _strict(int, (int,)))
    conv.register_structure_hook(float, _strict(float, (int, float)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    conv.register_structure_hook(PluginSpec, _plugin_spec)
    conv.register_structure_hook(ObjectiveSpec, _plugin_spec)
    conv.register_unstructure_hook(PluginSpec, _unstructure_spec)
    conv.register_unstructure_hook(ObjectiveSpec, _unstructure_spec)
    for cls in (AugmentConfig, DataConfig, OptimizerConfig, TrainerConfig, EvaluationConfig,
                Recipe):
        conv.register_structure_hook(cls, _table(cls, conv))
    return conv


CONVERTER = _converter()
_AT = re.compile(r"^(?P<msg>.*) @ \$(?P<path>.*)$", re.S)


_SUB = "\x00"  # separates a sub-key from the message in _format_exception's output


def _cattrs_errors(exc: ClassValidationError, what: str = "invalid recipe") -> ConfigError:
    messages = cattrs.transform_error(exc, path="$", format_exception=_format_exception)
    lines, paths = [], []
    for message in messages:
        m = _AT.match(message)
        if m is None:
            lines.append(message)
            continue
        # a table's keys as recipe key paths spell them: shifts['noise'] -> shifts.noise
        path, text = re.sub(r"\['([^'\]]*)'\]", r".\1", m["path"]).lstrip("."), m["msg"]
        for entry in text.split(_SUB * 2):
            key, _, msg = entry.rpartition(_SUB)
            where = f"{path}.{key}" if path and key else path or key
            paths.append(where)
            lines.append(f"{where}: {msg}" if where else msg)
    return ConfigError(f"{what}: " + "; ".join(lines) if len(lines) > 1 else lines[0],
                       path=paths[0] if paths else None)


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, ForbiddenExtraKeysError):
        accepted = [f.name for f in attrs.fields(exc.cl)]
        entries = []
        for key in sorted(exc.extra_fields):
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            entries.append(f"{key}{_SUB}unknown key; {hint}accepted: {', '.join(accepted)}")
        return (_SUB * 2).join(entries)
    if isinstance(exc, _KeyError):
        return f"{exc.key}{_SUB}{exc}"
    if isinstance(exc, _SettingError):
        return f"{exc.param}{_SUB}{exc.reason}"
    return str(exc)


# loading ------------------------------------------------------------------------------------


def parse_path(path: str) -> list[str | int]:
    """``"objectives[1].lambd"`` -> ``["objectives", 1, "lambd"]``."""
    parts: list[str | int] = []
    for token in path.split("."):
        m = re.fullmatch(r"([A-Za-z_][\w-]*)((?:\[\d+\])*)", token)
        if m is None:
            raise ConfigError(f"--set: cannot parse key path {path!r}", path=path)
        parts.append(m[1])
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m[2]))
    return parts


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except ValueError as exc:  # an integer too long to convert
        raise ConfigError(str(exc)) from None
    except RecursionError:
        raise ConfigError(f"value nested deeper than {MAX_DEPTH} levels") from None


MAX_DEPTH = 32  # arrays and tables nested deeper than this are refused
_INT64 = (-(2**63), 2**63 - 1)  # TOML's integer range
_SCALARS = (str, bool, int, float, datetime.date, datetime.time)  # datetime is a date
_SURROGATE = re.compile("[\ud800-\udfff]")


def plain(value: Any, path: str = "", depth: int = 0) -> Any:
    """A copy of ``value`` made of TOML values only: tables with string keys, arrays, strings,
    booleans, 64-bit integers, floats and dates, nested at most :data:`MAX_DEPTH` levels.
    Anything else raises :class:`ConfigError` naming its key path."""
    where = path or "recipe"
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels", path=path)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or _SURROGATE.search(key):
                raise ConfigError(f"{where}: table keys must be Unicode strings, got {key!r}",
                                  path=path)
            out[key] = plain(item, f"{path}.{key}" if path else key, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool) and not (
            _INT64[0] <= value <= _INT64[1]):
        raise ConfigError(f"{where}: integer out of TOML's 64-bit range "
                          f"[{_INT64[0]}, {_INT64[1]}]", path=path)
    if not isinstance(value, _SCALARS):
        raise ConfigError(f"{where}: not a TOML value: {type(value).__name__}", path=path)
    if isinstance(value, str) and _SURROGATE.search(value):
        raise ConfigError(f"{where}: not valid Unicode text (a lone surrogate)", path=path)
    return value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (value parsed as TOML, else taken as a string) to ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = parse_path(key.strip())
    try:
        value = plain(_parse_value(text.strip()), key.strip())
    except ConfigError as exc:
        where = "" if exc.path else f"{key.strip()}: "
        raise ConfigError(f"--set {where}{exc}", path=exc.path or key.strip()) from None
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = _join(parts[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"--set {key}: {where} does not exist", path=where)
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {_join(parts[:i])} is not a table", path=where)
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"--set {key}: {_join(parts)} does not exist", path=_join(parts))
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {_join(parts[:-1])} is not a table", path=key)
        node[last] = value


def _join(parts: Sequence[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_IMPORT_RULE = ("a recipe names registered plugins (paperplug plugins list), torch.optim "
                "optimizers and built-in datasets; to build a plugin from an importable factory, "
                "write module = \"package.module:factory\" and opt in with paperplug run "
                "--allow-imports or load_recipe(..., allow_imports=True)")


def check_imports(data: Any, *, allow_imports: bool = False, path: str = "") -> None:
    """Refuse what would make a recipe import a Python object: a ``module`` entry unless
    ``allow_imports``, and a ``name`` spelled as an import reference (``"os:system"``) always;
    the ConfigError names the key and the opt-in."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            check_imports(item, allow_imports=allow_imports, path=f"{path}[{i}]")
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key == "module" and not allow_imports:
            raise ConfigError(f"{where}: importing {_show(value)} needs the user's opt-in; "
                              f"{_IMPORT_RULE}", path=where)
        if key == "name" and isinstance(value, str) and _REFERENCE.fullmatch(value):
            raise ConfigError(f"{where}: {value!r} is an import reference, not a registered "
                              f"name; {_IMPORT_RULE}", path=where)
        check_imports(value, allow_imports=allow_imports, path=where)


def structure(data: Mapping[str, Any], *, allow_imports: bool = False) -> Recipe:
    """Turn a recipe mapping into a :class:`Recipe` (errors name the key path); ``module``
    entries are refused unless ``allow_imports`` (see the module docstring)."""
    check_imports(data, allow_imports=allow_imports)
    stages: list[Any] = []
    if "stages" in data:
        from sdk.stages import structure_stages

        data, stages = structure_stages(data, allow_imports=allow_imports)
    if "objectives" in data and isinstance(data["objectives"], Mapping):
        data = {**data, "objectives": [data["objectives"]]}
    try:
        recipe = CONVERTER.structure(dict(data), Recipe)
    except ClassValidationError as exc:
        raise _cattrs_errors(exc) from None
    recipe.stages = stages
    return recipe


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), *,
                allow_imports: bool = False) -> Recipe:
    """Read a TOML recipe (a path or a mapping), apply ``key=value`` overrides, structure it;
    ``allow_imports`` lets plugin tables give ``module = "package.module:factory"``."""
    data = read_recipe(source)
    for assignment in overrides:
        apply_override(data, assignment)
    return structure(data, allow_imports=allow_imports)


def read_recipe(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A TOML recipe (a path or a mapping) as plain data, not yet structured."""
    if isinstance(source, Mapping):
        data = plain(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"recipe {str(path)!r} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        try:
            parsed = tomllib.loads(text)
        except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
        try:
            data = plain(parsed)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}", path=exc.path) from None
    return data


def unstructure(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain TOML-ready data (the resolved recipe a run writes to config.toml);
    a staged recipe's stages as their tables were given."""
    data = CONVERTER.unstructure(attrs.evolve(recipe, stages=[]))
    del data["stages"]
    if recipe.stages:
        data["stages"] = [copy.deepcopy(s.table) for s in recipe.stages]
    return data


# TOML output --------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()
                                if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is."""
    return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f"
                                             else c) for c in text) + '"'


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dump_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Write nested mappings as TOML (``None`` values are left out)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping) or _is_table_list(value):
            tables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{_prefix}.{_key(key)}" if _prefix else _key(key)
        if isinstance(value, Mapping):
            out += f"\n[{name}]\n" + dump_toml(value, name)
        else:
            for item in value:
                out += f"\n[[{name}]]\n" + dump_toml(item, name)
    return out


# building -----------------------------------------------------------------------------------


def _kind_of(hint: Any) -> str | None:
    """The plugin kind a parameter annotation names (``Encoder | None`` -> ``"encoder"``)."""
    from sdk.interfaces import INTERFACES

    for c in (hint, *typing.get_args(hint)):
        if isinstance(c, type):
            for kind, iface in INTERFACES.items():
                if issubclass(c, iface):
                    return kind
        elif c is not hint and typing.get_args(c):
            found = _kind_of(c)
            if found:
                return found
    return None


def create(spec: PluginSpec, kind: str | None, path: str,
           context: BuildContext | None = None) -> Any:
    """Build ``spec`` as a plugin of ``kind`` (nested specs first), naming ``path`` in errors.

    ``kind`` is what the recipe slot or the parameter's type asks for; a ``kind`` the spec
    names must agree with it (with ``kind=None`` the spec's own kind is used). A plugin whose
    constructor fails is reported as a :class:`ConfigError` at ``path``."""
    from sdk.registry import _signature_params, _type_name, get_registry

    reg = get_registry()
    if spec.kind is not None and kind is not None and spec.kind != kind:
        raise ConfigError(f"{path}.kind: this entry takes a plugin of kind {kind!r}, got kind "
                          f"{spec.kind!r}", path=f"{path}.kind")
    kind = kind or spec.kind
    if spec.module is not None:
        factory = import_factory(spec.module, f"{path}.module")
    else:
        try:
            factory = reg.get(kind, spec.name).factory
        except PluginError as exc:
            key = "name" if kind in KINDS else "kind"
            raise ConfigError(f"{path}.{key}: {exc}", path=f"{path}.{key}") from None
    try:
        _, hints, _ = _signature_params(factory)
    except ValueError:  # an imported builtin without a signature
        hints = {}
    params: dict[str, Any] = {}
    has_nested_encoder = False
    for key, value in spec.params.items():
        where = f"{path}.{key}"
        if isinstance(value, PluginSpec) or isinstance(value, list) and value and isinstance(
                value[0], PluginSpec):
            sub_kind = _kind_of(hints.get(key)) if key in hints else None
            items = value if isinstance(value, list) else [value]
            built = []
            for i, item in enumerate(items):
                item_path = f"{where}[{i}]" if isinstance(value, list) else where
                if (item.kind or sub_kind) is None:
                    raise ConfigError(f"{item_path}: cannot tell which kind of plugin "
                                      f"{item.name!r} is; add kind = \"...\"", path=item_path)
                has_nested_encoder |= (sub_kind or item.kind) == "encoder"
                built.append(create(item, sub_kind, item_path, context))
            params[key] = built if isinstance(value, list) else built[0]
        else:
            hint = hints.get(key)
            if isinstance(value, list) and hint is not None and _wants_tuple(hint):
                value = tuple(value)
            params[key] = value
    if context is not None:
        for key, source in data_params(factory).items():
            value = getattr(context, source)
            if key not in params and value is not None and not (
                    source == "in_dim" and has_nested_encoder):
                params[key] = value
    if spec.module is not None:
        return _call_imported(factory, params, kind, spec, path)
    try:
        reg.validate(kind, spec.name, params)
    except ConfigError as exc:
        key = exc.param or ""
        where = f"{path}.{key}" if key else path
        message = str(exc)
        if key in hints and key in params and key in spec.params:
            message = (f"expected {_type_name(hints[key])}, got {_show(spec.params[key])} "
                       f"({kind} plugin {spec.name!r})")
        raise ConfigError(f"{where}: {message}", param=exc.param, path=where) from None
    try:
        return reg.create(kind, spec.name, **params)
    except ConfigError as exc:
        where = f"{path}.{exc.param}" if exc.param else path
        raise ConfigError(f"{where}: {exc}", param=exc.param, path=where) from None
    except Exception as exc:  # noqa: BLE001 - the plugin rejected the recipe's values
        raise ConfigError(f"{path}: {kind} plugin {spec.name!r} cannot be built from these "
                          f"parameters: {type(exc).__name__}: {exc}", path=path) from exc


def import_factory(reference: str, where: str) -> Any:
    """The callable ``"package.module:attr.path"`` names; a ConfigError at ``where`` otherwise."""
    import importlib

    module_name, _, attr = reference.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{where}: cannot import {module_name!r}: {exc}", path=where) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}",
                              path=where)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {reference!r} is a {type(obj).__name__}, not a factory",
                          path=where)
    return obj


def _call_imported(factory: Any, params: dict[str, Any], kind: str, spec: PluginSpec,
                   path: str) -> Any:
    """``factory(**params)``, which must return a plugin of ``kind`` (an encoder: any Module)."""
    from torch import nn

    from sdk.interfaces import INTERFACES

    try:
        instance = factory(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {spec.module}: {exc}", path=path) from None
    expected = nn.Module if kind == "encoder" else INTERFACES[kind]
    if not isinstance(instance, expected):
        raise ConfigError(f"{path}.module: {spec.module} returned an object of type "
                          f"{type(instance).__name__}; the {kind} slot needs an instance of "
                          f"{expected.__name__}", path=f"{path}.module")
    if kind == "objective":
        instance.name = spec.module
    return instance


def _wants_tuple(hint: Any) -> bool:
    options = [hint, *typing.get_args(hint)]
    has_tuple = any(o is tuple or typing.get_origin(o) is tuple for o in options)
    has_list = any(o is list or typing.get_origin(o) is list for o in options)
    return has_tuple and not has_list


def build_optimizer(config: OptimizerConfig) -> Any:
    """A factory ``params -> torch.optim.<name>(params, lr, weight_decay, **options)``."""
    import torch

    classes = {name.lower(): cls for name, cls in vars(torch.optim).items()
               if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)}
    cls = classes.get(config.name.lower())
    if cls is None:
        raise ConfigError(f"optimizer.name: unknown optimizer {config.name!r}; one of "
                          f"{', '.join(sorted(classes))}", path="optimizer.name")
    accepted = inspect.signature(cls).parameters
    for key in config.options:
        if key not in accepted:
            raise ConfigError(f"optimizer.options.{key}: {cls.__name__} has no parameter "
                              f"{key!r}", path=f"optimizer.options.{key}")
    kwargs = {"lr": config.lr, **config.options}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = config.weight_decay
    _probe_optimizer(cls, kwargs, torch.zeros(1, requires_grad=True))

    def factory(params: Any) -> Any:
        return cls(params, **kwargs)

    return factory


def _probe_optimizer(cls: type, kwargs: dict[str, Any], param: Any) -> None:
    """Build ``cls`` on one parameter; a rejected argument raises :class:`ConfigError` naming
    its recipe key (the first argument ``cls`` rejects on its own, else the whole table)."""
    try:
        cls([param], **kwargs)
        return
    except Exception as exc:  # noqa: BLE001 - torch raises ValueError, TypeError, ...
        error = exc
    where = "optimizer"
    for key, value in kwargs.items():
        try:
            cls([param], **{key: value})
        except Exception as exc:  # noqa: BLE001
            where, error = (f"optimizer.{key}" if key in ("lr", "weight_decay")
                            else f"optimizer.options.{key}"), exc
            break
    raise ConfigError(f"{where}: {cls.__name__} rejects it: {type(error).__name__}: {error}",
                      path=where) from error
