"""The non-finite guard: ``on_nonfinite="raise"`` stops naming the step, the terms and the last
good checkpoint; ``"skip"`` drops the update and counts it; neither reads the host per step."""

from __future__ import annotations

import pytest
import torch

import sdk
from sdk.errors import NonFiniteError, PluginFailure
from sdk.interfaces import Objective
from sdk.types import Loss
from tests.engine.conftest import make_data, make_mlp

BAD = 5  # the batch (0-based) whose loss or gradient is not finite: optimizer step 6


def _batches(n_batches: int = 8, bad: int | None = BAD, size: int = 8):
    """A list loader (fixed order) of (x, y, index) batches; batch ``bad`` has a NaN input."""
    data = make_data(n=n_batches * size)
    out = []
    for b in range(n_batches):
        x, y, i = (t[b * size:(b + 1) * size].clone() for t in data.tensors)
        if b == bad:
            x[0, 0] = float("nan")
        out.append((x, y, i))
    return out


class SqrtOfZero(Objective):
    """A finite loss (0) whose gradient is NaN on the batch holding sample ``index``:
    d/dz sqrt(|z - z.detach()|) at 0."""

    requires = {"views": 1, "index": True}

    def __init__(self, index: int):
        super().__init__()
        self.bad_index = index

    def forward(self, views, batch):
        z = views.embeddings[0]
        hit = z[batch.index == self.bad_index]  # no rows, and no NaN gradient, elsewhere
        return Loss(value=z.pow(2).mean() + (hit - hit.detach()).abs().sqrt().sum())


def _trainer(mode: str, objective=None, **kwargs):
    objective = objective if objective is not None else sdk.create("objective", "cross_entropy")
    args = {"max_epochs": 1, "device": "cpu", "progress": False, "on_nonfinite": mode,
            "log_every": 4, **kwargs}
    return sdk.Trainer(make_mlp(), objective, **args)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_raise_names_step_terms_and_last_good_checkpoint(tmp_path, precision):
    ce = sdk.create("objective", "cross_entropy")
    composed = 0.5 * sdk.create("objective", "nt_xent") + ce
    tr = _trainer("raise", composed, run_dir=tmp_path, checkpoint_every=2, precision=precision,
                  transforms=sdk.data.augmentation(noise=0.1))
    with pytest.raises(NonFiniteError) as err:
        tr.fit(_batches())
    e = err.value
    assert not isinstance(e, PluginFailure)
    assert e.step == BAD + 1
    assert set(e.terms) >= {"nt_xent", "cross_entropy"} and any(
        v != v for v in e.terms.values())  # a NaN term is named with its value
    assert f"step {BAD + 1}" in str(e) and "nt_xent" in str(e)
    # the newest checkpoint written before the bad step; none was written after it
    assert e.checkpoint is not None and e.checkpoint.endswith(f"step-{BAD - 1:06d}.pt")
    assert tr.checkpoint_path.name == f"step-{BAD - 1:06d}.pt"
    state = sdk.checkpoint.load(tr.checkpoint_path)
    assert all(torch.isfinite(v).all() for v in state["components"]["encoder"].values())


def test_raise_without_checkpoints_is_caught_at_the_epoch_end():
    tr = _trainer("raise", log_every=1000)
    with pytest.raises(NonFiniteError, match="no checkpoint was written") as err:
        tr.fit(_batches())
    assert err.value.step == BAD + 1 and err.value.checkpoint is None


def test_finite_runs_are_untouched_by_the_guard():
    for mode in ("raise", "skip"):
        a, b = _trainer(mode), _trainer("raise")
        a.fit(_batches(bad=None))
        b.fit(_batches(bad=None))
        assert a.skipped_steps == 0
        assert all(torch.equal(p, q) for p, q in zip(a.encoder.parameters(), b.encoder.parameters()))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("cause", ["loss", "gradient"])
def test_skip_drops_exactly_the_bad_update(tmp_path, precision, cause):
    """The weights equal those of a run that never saw the bad batch; the count and the logged
    losses (finite, the bad batch left out) say what happened."""
    batches = _batches(bad=BAD if cause == "loss" else None)
    bad_index = int(batches[BAD][2][0])
    objective = (lambda: sdk.create("objective", "cross_entropy")) if cause == "loss" else (
        lambda: SqrtOfZero(bad_index))
    if cause == "gradient":  # the loss is finite: "raise" sees it one step late, in the loss
        with pytest.raises(NonFiniteError) as err:  # of the weights the NaN gradient made
            _trainer("raise", objective(), precision=precision).fit(batches)
        assert err.value.step == BAD + 2
    skipping = _trainer("skip", objective(), precision=precision, run_dir=tmp_path)
    skipping.fit(batches)
    reference = _trainer("raise", objective(), precision=precision)
    reference.fit([b for i, b in enumerate(batches) if i != BAD])
    assert skipping.skipped_steps == 1 and skipping.step == len(batches)
    assert all(torch.equal(p, q) for p, q in zip(skipping.encoder.parameters(),
                                                 reference.encoder.parameters()))
    train = [r for r in skipping.history if r["kind"] == "train"]
    assert train[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in skipping.history if "loss" in r)
    assert sdk.engine.json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1


def test_skip_count_survives_resume(tmp_path):
    first = _trainer("skip", run_dir=tmp_path, max_steps=BAD + 2)
    first.fit(_batches())
    assert first.skipped_steps == 1
    resumed = _trainer("skip", run_dir=tmp_path)
    resumed.fit(_batches(), resume=True)
    assert resumed.skipped_steps == 1 and resumed.step == 8


def test_skip_with_accumulation_drops_the_whole_step():
    tr = _trainer("skip", accumulate=2)
    tr.fit(_batches())
    assert tr.skipped_steps == 1 and tr.step == 4
    epoch = [r for r in tr.history if r["kind"] == "epoch"][-1]
    assert torch.isfinite(torch.tensor(epoch["loss"]))


def test_unknown_mode_is_a_config_error():
    with pytest.raises(sdk.ConfigError) as err:
        _trainer("ignore")
    assert err.value.param == "on_nonfinite"
