"""What building a recipe fills in from the data: the :class:`FromData` marker.

A plugin asks for a value derived from the data by marking the parameter in its signature::

    def __init__(self, num_classes: Annotated[int | None, FromData("num_classes")] = None): ...

Building a recipe fills a marked parameter the recipe leaves out (and only a marked one: a
parameter that merely happens to be called ``labels`` is never touched). The values are the
fields of :class:`BuildContext`. ``in_dim`` is the width of the data's inputs, so it is not
filled in a plugin that wraps a nested encoder (whose output is that plugin's input).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import attrs


@attrs.define
class BuildContext:
    """The values a marked parameter can ask for, as known for one run's data."""

    in_dim: int | None = None  # input width (features per sample, flattened)
    num_classes: int | None = None
    labels: Any = None  # the training split's targets
    dataset: Any = None  # the training split


DATA_VALUES = tuple(f.name for f in attrs.fields(BuildContext))


def _known(instance: Any, attribute: Any, value: str) -> None:
    if value not in DATA_VALUES:
        raise ValueError(f"FromData({value!r}): unknown data value; one of {', '.join(DATA_VALUES)}")


@attrs.frozen
class FromData:
    """``Annotated[T, FromData(name)]``: recipe building fills this parameter with ``name``,
    one of ``in_dim``, ``num_classes``, ``labels``, ``dataset``, when the recipe leaves it out."""

    name: str = attrs.field(validator=_known)


def data_params(factory: Callable[..., Any]) -> dict[str, str]:
    """``{parameter: data value}`` for each parameter of ``factory`` marked with FromData."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations declare nothing
        return {}
    out = {}
    for name, hint in hints.items():
        for part in (hint, *typing.get_args(hint)):
            marks = [m for m in getattr(part, "__metadata__", ()) if isinstance(m, FromData)]
            if marks:
                out[name] = marks[0].name
                break
    return out
