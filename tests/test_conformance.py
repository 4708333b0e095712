"""The conformance kit over every registered plugin."""

import pytest

import sdk
from sdk.testing import check_plugin

CARDS = sdk.plugins()


def test_no_builtin_plugin_is_broken():
    assert sdk.broken_plugins() == []


@pytest.mark.parametrize("card", CARDS, ids=[f"{c.kind}:{c.name}" for c in CARDS])
def test_conformance(card):
    check_plugin(card.kind, card.name, builtin=True)
