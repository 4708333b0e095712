"""sdk.fuzz: the fuzzed conformance inputs catch what the fixed ones miss."""

import pytest
import torch

import sdk
from sdk.fuzz import fuzz_plugin
from sdk.interfaces import Objective
from sdk.types import Loss


def _registry(cls):
    reg = sdk.Registry()
    reg.add(cls, card=sdk.Card(name="toy", kind="objective", title="t", summary="s"))
    return reg


class ClassWeighted(Objective):
    """Squared norms of two views, each sample weighted by a per-class table indexed by
    Batch.targets (torch raises IndexError for an id past the table)."""

    requires = {"views": 2, "targets": True}
    batch_coupled = False

    def forward(self, views, batch):
        z1, z2 = (z.float() for z in views.embeddings[:2])
        per = (z1.pow(2).sum(1) + z2.pow(2).sum(1)) * torch.ones(8)[batch.targets]
        return Loss(value=per.mean(), per_sample=per)


class NanHiding(ClassWeighted):
    """The same loss with non-finite per-sample terms dropped: a NaN input is hidden."""

    def forward(self, views, batch):
        per = views.embeddings[0].float().pow(2).sum(1) + views.embeddings[1].float().pow(2).sum(1)
        per = torch.nan_to_num(per, nan=0.0, posinf=0.0)
        return Loss(value=per.mean(), per_sample=per)


class RefusesWideViews(ClassWeighted):
    """Refuses any embedding wider than 4 (an ordinary input)."""

    def forward(self, views, batch):
        if views.embeddings[0].shape[1] > 4:
            raise sdk.ShapeError("objective 'toy': Views.embeddings too wide")
        return super().forward(views, batch)


class Honest(ClassWeighted):
    """Names the plugin and the field for a batch it cannot take."""

    def forward(self, views, batch):
        sdk.types.check_ids(f"objective {self.name!r}", "Batch.targets", batch.targets, 8)
        per = views.embeddings[0].float().pow(2).sum(1) + views.embeddings[1].float().pow(2).sum(1)
        return Loss(value=per.mean(), per_sample=per)


@pytest.mark.parametrize(("cls", "error"), [
    (ClassWeighted, r"\[objective toy\] fuzz invalid input: targets of rank 3: the error must name"),
    (NanHiding, r"\[objective toy\] fuzz non-finite input: nan in the inputs: the loss is finite"),
    (RefusesWideViews, r"\[objective toy\] fuzz valid input: an ordinary input .* was refused"),
])
def test_the_fuzz_rejects_internal_errors_hidden_nans_and_refused_ordinary_inputs(cls, error):
    with pytest.raises(AssertionError, match=error):
        fuzz_plugin("objective", "toy", registry=_registry(cls), max_examples=30)


def test_the_fuzz_passes_a_plugin_that_names_itself_and_the_field():
    fuzz_plugin("objective", "toy", registry=_registry(Honest), max_examples=30)


def test_check_plugin_runs_the_fuzz_unless_told_not_to():
    reg = _registry(ClassWeighted)
    with pytest.raises(AssertionError, match=r"fuzz invalid input"):
        sdk.testing.check_plugin("objective", "toy", registry=reg)
    sdk.testing.check_plugin("objective", "toy", registry=reg, fuzz=0)


def test_every_interface_and_every_registered_plugin_is_fuzzed():
    """No kind escapes the fuzz: each interface of sdk.interfaces has fuzzed inputs (so plugins
    of kinds not registered yet are covered), and every registered plugin is fuzzable."""
    from sdk.fuzz import FUZZED_INTERFACES, fuzzable
    from sdk.interfaces import INTERFACES, DataSampler

    assert set(INTERFACES.values()) | {DataSampler} <= set(FUZZED_INTERFACES)
    reg = sdk.registry.get_registry()
    missing = [f"{c.kind} {c.name}" for c in sdk.plugins() if not fuzzable(reg.create(c.kind, c.name))]
    # experiment trackers read records, not batches; their tests read the trackers' stores back
    assert missing == ["callback mlflow", "callback tensorboard", "callback wandb"]
