"""sdk.sample_stats: each statistic equals a slow per-sample loop over several updates
(duplicates within an update included), the statistics resume exactly inside a killed run, and
two gloo ranks merged by index equal one process on the concatenated batches."""

import os
import sys
from pathlib import Path

import pytest
import torch

import sdk
from sdk.sample_stats import SampleStats, confidence_and_margin
from sdk.testing import run_ranks
from sdk.types import Batch


def slow(updates, n, momentum):
    seen, loss, ema = [0] * n, [0.0] * n, [0.0] * n
    conf, margin, correct, forgetting = [0.0] * n, [0.0] * n, [False] * n, [0] * n
    for index, losses, logits, targets in updates:
        last = {int(i): p for p, i in enumerate(index)}  # the last occurrence wins
        for i, p in last.items():
            value = float(losses[p])
            ema[i] = value if seen[i] == 0 else momentum * ema[i] + (1 - momentum) * value
            loss[i] = value
            z, y = logits[p].tolist(), int(targets[p])
            other = max(v for k, v in enumerate(z) if k != y)
            right = z[y] - other > 0
            if seen[i] > 0 and correct[i] and not right:
                forgetting[i] += 1
            conf[i] = float(torch.softmax(logits[p], 0)[y])
            margin[i], correct[i] = z[y] - other, right
            seen[i] += 1
    return seen, loss, ema, conf, margin, correct, forgetting


def random_updates(steps, n, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        index = torch.randint(0, n, (b,), generator=g)  # duplicates happen
        out.append((index, torch.rand(b, generator=g), torch.randn(b, 3, generator=g),
                    torch.randint(0, 3, (b,), generator=g)))
    return out


def test_statistics_equal_a_slow_loop():
    updates = random_updates(12, 10, 8)
    stats = SampleStats(10, momentum=0.7)
    for u in updates:
        stats.update(*u)
    seen, loss, ema, conf, margin, correct, forgetting = slow(updates, 10, 0.7)
    assert stats.seen.tolist() == seen and stats.correct.tolist() == correct
    assert stats.forgetting.tolist() == forgetting and sum(forgetting) > 0
    for got, want in ((stats.loss, loss), (stats.loss_ema, ema), (stats.confidence, conf),
                      (stats.margin, margin)):
        assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_margin_and_confidence_by_hand():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    conf, margin, right = confidence_and_margin(logits, torch.tensor([0, 2]))
    assert torch.allclose(margin, torch.tensor([1.0, -4.0]))
    assert right.tolist() == [True, False]
    assert torch.allclose(conf, torch.softmax(logits, 1)[[0, 1], [0, 2]])


def test_bad_inputs_are_named():
    stats = SampleStats(5)
    with pytest.raises(sdk.ShapeError, match=r"Batch.index must be integer row ids \[3\]"):
        stats.update(torch.zeros(3), torch.ones(3))
    with pytest.raises(sdk.RequirementError, match="logits given without class targets"):
        stats.update(torch.arange(3), torch.ones(3), torch.zeros(3, 2))
    with pytest.raises(sdk.ConfigError, match="momentum"):
        SampleStats(5, momentum=1.0)


class Recorder(sdk.interfaces.Reweighter):
    """Uniform weights that record every training batch's losses (a stateful reweighter)."""

    def __init__(self):
        super().__init__()
        self.stats = SampleStats(40, momentum=0.5)

    def weights(self, per_sample, batch: Batch):
        if self.training:
            self.stats.update(batch.index, per_sample)
        return torch.ones_like(per_sample)


def test_statistics_resume_exactly_in_a_killed_run(tmp_path):
    runs = sdk.testing.check_resume(objective=lambda: sdk.create("objective", "cross_entropy"),
                                    reweighter=Recorder, transforms=lambda: [None], tmp_dir=tmp_path)
    assert int(runs.resumed.reweighter.stats.seen.sum()) == 6 * 8


WORKER = """
import sys, torch
from sdk import distributed
from sdk.sample_stats import SampleStats
from tests.test_sample_stats import random_updates
distributed.init("gloo")
r = distributed.rank()
stats = SampleStats(10, momentum=0.7)
for index, loss, logits, targets in random_updates(6, 10, 8):
    half = slice(4 * r, 4 * r + 4)  # rank 0 the first half of each batch, rank 1 the second
    stats.update(index[half], loss[half], logits[half], targets[half])
torch.save(stats.state_dict(), sys.argv[1] + f"/rank{r}.pt")
torch.distributed.destroy_process_group()
"""


def test_two_ranks_merge_by_index_and_equal_one_process(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    run_ranks([sys.executable, "-c", WORKER, str(tmp_path)], world=2, timeout=120, cwd=root,
              env={"PYTHONPATH": path})
    one = SampleStats(10, momentum=0.7)
    for u in random_updates(6, 10, 8):
        one.update(*u)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in one.state_dict().items():
            assert torch.equal(got[key], value), key
