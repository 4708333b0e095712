"""The conformance kit over every registered plugin (on CUDA too when a GPU is present)."""

import pytest
import torch

import sdk
from sdk.testing import check_plugin

CARDS = sdk.plugins()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Plugins whose defaults cost by size alone (a 65536-row memory searched on every call, 1000
# warm-up steps on every fit) run the kit at a smaller size; their own tests pin the defaults.
SMALLER = {
    "mugs_local_group": {"memory_size": 4096, "queue_size": 4096},
    "krr_ssl_distill": {"online_iterations": 20},
}


def test_no_builtin_plugin_is_broken():
    assert sdk.broken_plugins() == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("card", CARDS, ids=[f"{c.kind}:{c.name}" for c in CARDS])
def test_conformance(card, device):
    check_plugin(card.kind, card.name, builtin=True, device=device, **SMALLER.get(card.name, {}))


def test_kit_catches_an_objective_that_ignores_a_view():
    from sdk.registry import Registry

    class FirstViewOnly(sdk.interfaces.Objective):
        requires = {"views": 2}
        batch_coupled = False

        def forward(self, views, batch):
            return sdk.Loss(value=views.embeddings[0].pow(2).mean())

    reg = Registry()
    reg.add(FirstViewOnly,
            card=sdk.Card(name="lazy", kind="objective", title="t", summary="s"))
    with pytest.raises(AssertionError, match=r"\[objective lazy\] gradient: input #1 of shape \[8, 16\]"):
        check_plugin("objective", "lazy", registry=reg)


def test_kit_requires_paper_and_formula_for_builtins():
    from sdk.registry import Registry

    reg = Registry()
    reg.add(sdk.registry.get_registry().get("objective", "nt_xent").factory,
            card=sdk.Card(name="bare", kind="objective", title="t", summary="s"))
    with pytest.raises(AssertionError, match=r"\[bare\] card: empty fields \['paper', 'formula'\]"):
        check_plugin("objective", "bare", registry=reg, builtin=True)
