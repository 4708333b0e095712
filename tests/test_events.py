"""The events are declared once (sdk.events.Event): the Callback base, the pluggy hook specs and
the concepts page are derived from that list and cannot drift from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import attrs

import sdk
from sdk import hookspecs
from sdk.events import EVENTS, Event, State, closest, table
from sdk.interfaces import Callback

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hook_specs() -> set[str]:
    return {name for name, value in vars(hookspecs).items()
            if name.startswith(hookspecs.PREFIX) and callable(value)
            and hasattr(value, f"{hookspecs.PROJECT}_spec")}


def test_callback_methods_and_hook_specs_are_exactly_the_events():
    listed = [name for name in vars(Callback) if name.startswith(("on_", "before_", "after_"))]
    assert listed == list(EVENTS) == [e.value for e in Event]
    assert _hook_specs() == {f"paperplug_{e}" for e in EVENTS} | {"paperplug_register"}
    for event in Event:
        method = vars(Callback)[event.value]
        assert list(inspect.signature(method).parameters) == ["self", "state"]
        assert method.__doc__ == event.doc and event.doc.strip()
        spec = vars(hookspecs)[hookspecs.hook_name(event)]
        assert list(inspect.signature(spec).parameters) == ["state"]
        assert spec.__doc__ == event.doc


def test_registered_plugin_manager_knows_every_event_hook():
    pm = sdk.get_registry().plugin_manager
    for event in EVENTS:
        assert vars(pm.hook)[f"paperplug_{event}"].spec is not None


def test_closest_event_and_state_fields():
    assert closest("on_epoch_begin") == "on_epoch_start"
    assert closest("on_train_end") == "on_fit_end"
    assert closest("after_optimiser_step") == "after_optimizer_step"
    assert closest("on_zzz_qqq") is None
    state = State(epoch=3)
    assert (state.step, state.epoch, state.batch, state.views, state.loss) == (0, 3, None, None, None)
    assert set(attrs.fields_dict(State)) == {
        "trainer", "model", "optimizer", "step", "epoch", "x", "batch", "views", "loss", "record"}


def test_concepts_page_lists_every_event_with_its_doc():
    page = (DOCS / "concepts.md").read_text()
    assert table() in page
