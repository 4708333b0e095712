"""sdk.reweighting: the batch-coupled reweighters (kl_dro_instance_weights,
loss_based_sample_reweighting) on two gloo ranks give each rank its rows of one process's
weights times the world size, so the ranks' averaged loss equals one process's."""

import os
import sys
from pathlib import Path

import torch

import sdk
from sdk.testing import run_ranks
from sdk.types import Batch, Loss

CASES = [("kl_dro_instance_weights", {"r": 0.5}), ("loss_based_sample_reweighting", {"burnin": 0})]

WORKER = """
import sys, torch, sdk
from sdk import distributed
from sdk.types import Batch, Loss
from tests.test_reweighting import CASES, losses
distributed.init("gloo")
r = distributed.rank()
out = {}
for name, params in CASES:
    per = losses()[6 * r:6 * r + 6].clone().requires_grad_()
    reduced = sdk.create("reweighter", name, **params).reduce(Loss(value=per.mean(), per_sample=per), Batch())
    out[name] = (reduced.value.detach(), torch.autograd.grad(reduced.value, per)[0])
torch.save(out, sys.argv[1] + f"/rank{r}.pt")
torch.distributed.destroy_process_group()
"""


def losses():
    return 4 * torch.rand(12, generator=torch.Generator().manual_seed(3))


def test_two_ranks_equal_one_process(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    run_ranks([sys.executable, "-c", WORKER, str(tmp_path)], world=2, timeout=120, cwd=root,
              env={"PYTHONPATH": path})
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, params in CASES:
        per = losses().requires_grad_()
        one = sdk.create("reweighter", name, **params).reduce(Loss(value=per.mean(), per_sample=per), Batch())
        grad = torch.autograd.grad(one.value, per)[0]
        mean = (ranks[0][name][0] + ranks[1][name][0]) / 2  # what DDP's gradient average optimises
        torch.testing.assert_close(mean, one.value.detach())
        for r in range(2):  # each rank's gradient, averaged, is one process's
            torch.testing.assert_close(ranks[r][name][1] / 2, grad[6 * r:6 * r + 6])
