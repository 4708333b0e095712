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

import difflib
import inspect
import json
import math
import operator
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import annotated_types
import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

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


@attrs.define(kw_only=True)
class AugmentConfig:
    """The view generator (:func:`sdk.data.augmentation`); all off by default."""

    shift: int = 0
    noise: float = 0.0
    mask: float = 0.0
    scale: float = 0.0


@attrs.define(kw_only=True)
class DataConfig:
    name: str = "digits"
    batch_size: int = 256
    calibration_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    num_workers: int = 0
    drop_last: bool = True
    augment: AugmentConfig | None = None


@attrs.define(kw_only=True)
class OptimizerConfig:
    """``torch.optim.<name>(params, lr=lr, weight_decay=weight_decay, **options)``."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    options: dict[str, Any] = attrs.Factory(dict)


class _SettingError(ConfigError):
    """A trainer setting outside its constraints: ``"<name> <reason>"``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} {reason}", param=name)
        self.reason = reason


_BOUNDS = {annotated_types.Gt: ("gt", ">", operator.gt), annotated_types.Ge: ("ge", ">=", operator.ge),
           annotated_types.Lt: ("lt", "<", operator.lt), annotated_types.Le: ("le", "<=", operator.le)}


def constraint_text(constraint: Any) -> str:
    """``Ge(1)`` -> ``">= 1"``; a tuple of choices -> ``"one of '32', 'bf16-mixed'"``."""
    if isinstance(constraint, tuple):
        return "one of " + ", ".join(repr(c) for c in constraint)
    attr, symbol, _ = _BOUNDS[type(constraint)]
    return f"{symbol} {getattr(constraint, attr)}"


def _satisfies(value: Any, constraint: Any) -> bool:
    if isinstance(constraint, tuple):
        return value in constraint
    attr, _, compare = _BOUNDS[type(constraint)]
    return compare(value, getattr(constraint, attr))


def _check_setting(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    for constraint in attribute.metadata["constraints"]:
        if value is not None and not _satisfies(value, constraint):
            raise _SettingError(attribute.name, f"must be {constraint_text(constraint)}, got "
                                                f"{_show(value)}")


def setting(default: Any, doc: str, *constraints: Any) -> Any:
    """A :class:`TrainerConfig` field: default, one-line doc and constraints, each an
    annotated-types bound (``Ge(1)``, ``Gt(0)``, ...) or a tuple of allowed values."""
    return attrs.field(default=default, validator=_check_setting,
                       metadata={"doc": doc, "constraints": constraints})


PRECISIONS = ("32", "bf16-mixed", "fp16-mixed")


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


@attrs.define(kw_only=True)
class EvaluationConfig:
    """How a run is measured: kNN (weighted, InstDisc) and linear probe on the representation
    (backbone features when the encoder has them and ``features`` is true)."""

    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_probe: bool = True
    features: bool = True
    random_init: bool = True


@attrs.define(kw_only=True)
class Recipe:
    name: str = "recipe"
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


# structuring --------------------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


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
    if module is None and not isinstance(value["name"], str):
        raise _KeyError("name", f"expected str, got {_show(value['name'])}")
    rest = dict(value)
    rest.pop("module", None)
    name, kind = rest.pop("name", module), rest.pop("kind", None)
    extra: dict[str, Any] = {}
    if cls is ObjectiveSpec and "weight" in rest:
        weight = rest.pop("weight")
        if isinstance(weight, Mapping):
            extra["weight"] = _plugin_spec(weight, PluginSpec)
        elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
            extra["weight"] = float(weight)
        else:
            raise _KeyError("weight", f"expected a number or a schedule table, got {_show(weight)}")
    return cls(name=name, kind=kind, module=module,
               params={k: _nested(v) for k, v in rest.items()}, **extra)


def _is_plugin_table(value: Any) -> bool:
    return isinstance(value, Mapping) and ("name" in value or "module" in value)


def _nested(value: Any) -> Any:
    if _is_plugin_table(value):
        return _plugin_spec(value, PluginSpec)
    if isinstance(value, list) and value and all(_is_plugin_table(v) for v in value):
        return [_plugin_spec(v, PluginSpec) for v in value]
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


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
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
        path, text = m["path"].lstrip("."), m["msg"]
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


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.path=value`` (value parsed as TOML, else taken as a string) to ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = parse_path(key.strip())
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
        node[last] = _parse_value(text.strip())
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {_join(parts[:-1])} is not a table", path=key)
        node[last] = _parse_value(text.strip())


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
    if "objectives" in data and isinstance(data["objectives"], Mapping):
        data = {**data, "objectives": [data["objectives"]]}
    try:
        return CONVERTER.structure(dict(data), Recipe)
    except ClassValidationError as exc:
        raise _cattrs_errors(exc) from None


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), *,
                allow_imports: bool = False) -> Recipe:
    """Read a TOML recipe (a path or a mapping), apply ``key=value`` overrides, structure it;
    ``allow_imports`` lets plugin tables give ``module = "package.module:factory"``."""
    if isinstance(source, Mapping):
        data = json.loads(json.dumps(source))
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    return structure(data, allow_imports=allow_imports)


def unstructure(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain TOML-ready data (the resolved recipe a run writes to config.toml)."""
    return CONVERTER.unstructure(recipe)


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
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items()
                                if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


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


def create(spec: PluginSpec, kind: str, path: str, context: BuildContext | None = None) -> Any:
    """Build ``spec`` as a plugin of ``kind`` (nested specs first), naming ``path`` in errors."""
    from sdk.registry import _signature_params, _type_name, get_registry

    reg = get_registry()
    kind = spec.kind or kind
    if spec.module is not None:
        factory = import_factory(spec.module, f"{path}.module")
    else:
        try:
            factory = reg.get(kind, spec.name).factory
        except PluginError as exc:
            raise ConfigError(f"{path}.name: {exc}", path=f"{path}.name") from None
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
                k = item.kind or sub_kind
                item_path = f"{where}[{i}]" if isinstance(value, list) else where
                if k is None:
                    raise ConfigError(f"{item_path}: cannot tell which kind of plugin "
                                      f"{item.name!r} is; add kind = \"...\"", path=item_path)
                has_nested_encoder |= k == "encoder"
                built.append(create(item, k, item_path, context))
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

    def factory(params: Any) -> Any:
        return cls(params, **kwargs)

    return factory
