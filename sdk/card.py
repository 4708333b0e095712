"""Method cards: what a plugin implements, from which paper, with which parameters."""

from __future__ import annotations

import attrs

KINDS = (
    "encoder", "objective", "sampler", "calibrator", "reweighter",
    "teacher", "schedule", "metric", "transform", "callback", "detector", "adapter",
)


def _check_kind(instance, attribute, value):
    if value not in KINDS:
        raise ValueError(f"Card.kind: {value!r} is not one of {', '.join(KINDS)}")


def _non_empty(instance, attribute, value):
    if not value or not value.strip():
        raise ValueError(f"Card.{attribute.name} must be a non-empty string")


@attrs.frozen(kw_only=True)
class Param:
    """One constructor parameter of a plugin, read from its factory's signature.

    ``from_data`` names the data value recipe building fills it with (its
    :class:`~sdk.context.FromData` marker), if any.
    """

    name: str
    type: str
    default: object = attrs.field(default=attrs.NOTHING, repr=False)
    doc: str = ""
    from_data: str = ""
    constraint: str = ""  # the declared constraint, readable (``> 0``, ``in [0, 1)``); "" if none

    @property
    def required(self) -> bool:
        return self.default is attrs.NOTHING

    def default_repr(self) -> str:
        return "required" if self.required else repr(self.default)

    def default_text(self) -> str:
        """The default as a card shows it: ``None; filled from the data (num_classes)``."""
        source = f"; filled from the data ({self.from_data})" if self.from_data else ""
        return self.default_repr() + source


@attrs.frozen(kw_only=True)
class Card:
    """A plugin's method card.

    Third parties must give ``name``, ``kind``, ``title`` and ``summary``; built-in plugins
    also give ``paper`` (arXiv id or link), ``formula`` and, where relevant, ``left_out``.
    ``params`` is filled by the registry from the factory's signature, so it is always true;
    ``package`` and ``family`` (``plugins/<family>/`` for a built-in plugin, the distribution's
    name for a third party's) are filled by the registry from where the plugin was found.
    """

    name: str = attrs.field(validator=_non_empty)
    kind: str = attrs.field(validator=_check_kind)
    title: str = attrs.field(validator=_non_empty)
    summary: str = attrs.field(validator=_non_empty)
    paper: str = ""
    formula: str = ""
    left_out: str = ""
    params: tuple[Param, ...] = ()
    package: str = ""
    family: str = ""

    def missing_fields(self) -> list[str]:
        """Names of the fields a built-in plugin's card must fill but leaves empty."""
        return [f for f in ("paper", "formula") if not getattr(self, f).strip()]
