"""sdk.testing.check_resume: passes for a plugin whose per-sample state is checkpointed and fails,
naming the plugin and the key, for the same plugin with a buffer left out of its state_dict."""

import pytest
import torch

import sdk
from sdk.interfaces import Objective
from sdk.types import Loss


class RunningWeight(Objective):
    """Squared distance between two views, each sample weighted by 1 + a running mean of its own
    past losses (a buffer keyed by Batch.index, which ``persistent=False`` leaves out of the
    state_dict)."""

    requires = {"views": 2, "index": True}

    def __init__(self, persistent: bool = True):
        super().__init__()
        self.register_buffer("avg", torch.zeros(40), persistent=persistent)

    def forward(self, views, batch):
        z1, z2 = views.embeddings[:2]
        per = (z1 - z2).pow(2).sum(1) - 0.1 * z1.norm(dim=1)
        weighted = (1 + self.avg[batch.index]) * per
        with torch.no_grad():
            self.avg[batch.index] = 0.5 * self.avg[batch.index] + 0.5 * per.detach()
        return Loss(value=weighted.mean(), per_sample=per)


def test_a_checkpointed_buffer_resumes_exactly(tmp_path):
    runs = sdk.testing.check_resume(objective=RunningWeight, steps=7, kill_at=5, tmp_dir=tmp_path)
    assert bool((runs.resumed.objective.avg != 0).all())  # every sample's entry carries state
    assert runs.killed.step == 5 and runs.resumed.step == runs.straight.step == 7


def test_a_buffer_missing_from_the_state_dict_fails_naming_plugin_and_key(tmp_path):
    with pytest.raises(AssertionError, match=r"\[objective RunningWeight\] resume: .*buffer 'avg'"):
        sdk.testing.check_resume(objective=lambda: RunningWeight(persistent=False), steps=7, kill_at=5,
                                 tmp_dir=tmp_path)


@pytest.mark.parametrize(("steps", "kill_at", "every"), [(6, 2, 2), (6, 6, 2), (6, 1, 2)])
def test_a_kill_without_a_checkpoint_before_it_or_steps_after_it_is_refused(tmp_path, steps, kill_at,
                                                                             every):
    with pytest.raises(ValueError, match="checkpoint_every < kill_at < steps"):
        sdk.testing.check_resume(objective=RunningWeight, steps=steps, kill_at=kill_at,
                                 checkpoint_every=every, tmp_dir=tmp_path)


class Undeclared(Objective):
    """A per-sample loss that does not say whether it couples the samples of a batch."""

    requires = {"views": 2}

    def forward(self, views, batch):
        z1, z2 = views.embeddings[:2]
        per = (z1 - z2).pow(2).sum(1)
        return Loss(value=per.mean(), per_sample=per)


class Declared(Undeclared):
    batch_coupled = False


@pytest.mark.parametrize(("cls", "error"), [(Undeclared, "batch_coupled must be declared"),
                                            (Declared, None)])
def test_the_kit_requires_objectives_to_declare_batch_coupling(cls, error):
    reg = sdk.Registry()
    reg.add(cls, card=sdk.Card(name="sq", kind="objective", title="t", summary="s"))
    if error is None:
        sdk.testing.check_plugin("objective", "sq", registry=reg)
    else:
        with pytest.raises(AssertionError, match=rf"\[objective sq\] declaration: {error}"):
            sdk.testing.check_plugin("objective", "sq", registry=reg)


def test_run_ranks_retries_a_failed_rendezvous_and_reports_a_failing_rank(tmp_path):
    """A launch whose ranks die of a rendezvous symptom is retried on a new port; a rank that
    fails for its code's sake is reported with its output, after as many launches."""
    import sys

    from sdk.testing import run_ranks

    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, pathlib\n"
        "mark = pathlib.Path(sys.argv[1]) / f\"launch{os.environ['MASTER_PORT']}-{os.environ['RANK']}\"\n"
        "mark.touch()\n"
        "launches = len({p.name.split('-')[0] for p in pathlib.Path(sys.argv[1]).glob('launch*')})\n"
        "if sys.argv[2] == 'flaky' and launches == 1:\n"
        "    print('terminate called without an active exception'); sys.exit(134)\n"
        "if sys.argv[2] == 'broken':\n"
        "    print('ValueError: a real bug'); sys.exit(1)\n"
        "print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\n")
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    outputs = run_ranks([sys.executable, str(script), str(flaky), "flaky"], world=2, timeout=60)
    assert [o.strip() for o in outputs] == ["rank 0 of 2", "rank 1 of 2"]
    assert len({p.name.split("-")[0] for p in flaky.glob("launch*")}) == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(AssertionError, match="exited with 1:\nValueError: a real bug"):
        run_ranks([sys.executable, str(script), str(broken), "broken"], world=2, timeout=60)
    assert len({p.name.split("-")[0] for p in broken.glob("launch*")}) == 1  # not retried
