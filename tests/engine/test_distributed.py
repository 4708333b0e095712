"""DDP on two gloo CPU ranks equals one process on the doubled batch.

The two ranks run ``ddp_worker.py`` once (module fixture) with torchrun's environment; the
single-process references run here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import sdk
from sdk import distributed
from sdk.testing import run_ranks

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(sdk.__file__).parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_ranks([sys.executable, str(WORKER), str(out)], world=2, cwd=str(ROOT))
    return out


def test_ddp_with_gather_equals_one_process_on_the_doubled_batch(ranks):
    module = _worker_module()
    r0, r1 = torch.load(ranks / "train_rank0.pt"), torch.load(ranks / "train_rank1.pt")
    assert r0["world"] == r1["world"] == 2
    # the plain DataLoader was sharded for the user: N / (2 ranks * B) steps per epoch
    steps = module.EPOCHS * module.N // (2 * module.BATCH)
    assert r0["step"] == r1["step"] == steps
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)  # the ranks stay in lockstep
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = module.reference()
    finally:
        torch.set_num_threads(threads)
    assert ref.step == steps
    for p, q in zip(r0["params"], ref.encoder.parameters()):
        torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)
    init = [p.detach() for p in module.model().parameters()]
    moved = max(float((p - q).abs().max()) for p, q in zip(r0["params"], init))
    assert moved > 1e-2  # training really changed the parameters


def test_sam_under_ddp_equals_sam_on_the_doubled_batch(ranks):
    """The sam callback's second pass (trainer.recompute_gradients) averages its gradients over
    the ranks and gathers embeddings again, so the ranks reproduce one process's SAM."""
    module = _worker_module()
    r0, r1 = torch.load(ranks / "train_rank0.pt"), torch.load(ranks / "train_rank1.pt")
    for p, q in zip(r0["sam_params"], r1["sam_params"]):
        assert torch.equal(p, q)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = module.reference(sam=True)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(r0["sam_params"], ref.encoder.parameters()):
        torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)
    gap = max(float((p - q).abs().max()) for p, q in zip(r0["sam_params"], r0["params"]))
    assert gap > 1e-3  # and SAM is not plain training


def test_only_rank_zero_logs_and_checkpoints(ranks):
    run0, run1 = ranks / "run0", ranks / "run1"
    assert not run1.exists() or not any(run1.iterdir())
    records = [json.loads(line) for line in (run0 / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in records if r["kind"] == "train"]
    assert train == sorted(set(train)) == list(range(1, len(train) + 1))  # each step logged once
    state = sdk.checkpoint.load_newest(run0 / "checkpoints")[1]
    assert len(state["rng"]) == 2  # every rank's generators are in the checkpoint


def test_a_wrapped_module_trains_under_ddp_and_only_rank_zero_tracks(ranks, tmp_path):
    """A user's plain module through sdk.encoder trains under DDP as the built-in model does
    (the ranks in lockstep, equal to one process on the doubled batch), and the TensorBoard
    tracker writes from rank 0 only."""
    module = _worker_module()
    r0, r1 = torch.load(ranks / "tracked_rank0.pt"), torch.load(ranks / "tracked_rank1.pt")
    for p, q in zip(r0, r1):
        assert torch.equal(p, q)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = module.tracked(module.WORLD * module.BATCH, tmp_path / "tb")
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(r0, ref.encoder.parameters()):
        torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)
    assert list((ranks / "tb0").glob("events.out.tfevents.*"))
    assert not (ranks / "tb1").exists() or not any((ranks / "tb1").iterdir())


@pytest.mark.parametrize("name", ["nt_xent", "decoupled_contrastive",
                                  "decoupled_contrastive_weighted"])
def test_gathered_objective_gradients_equal_the_doubled_batch(ranks, name):
    """Each rank's loss is the mean over its own anchors against every rank's candidates.
    The single-process loss on the doubled batch is the mean of the rank losses, and its
    gradient with respect to rank r's embeddings is rank r's gradient divided by the world size
    (the gather's backward sums every rank's contribution; DDP then averages)."""
    module = _worker_module()
    results = [torch.load(ranks / f"objectives_rank{r}.pt")[name] for r in range(2)]
    z1, z2 = (z.requires_grad_(True) for z in module.global_embeddings())
    single = module.objective(name)(sdk.Views(embeddings=(z1, z2))).value
    single.backward()
    assert distributed.world_size() == 1
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, single.detach(),
                               atol=1e-6, rtol=0)
    b = module.BATCH
    for r, res in enumerate(results):
        g1, g2 = res["grads"]
        torch.testing.assert_close(g1 / 2, z1.grad[r * b:(r + 1) * b], atol=1e-6, rtol=0)
        torch.testing.assert_close(g2 / 2, z2.grad[r * b:(r + 1) * b], atol=1e-6, rtol=0)
    # and the gather matters: a rank's loss without it (its half alone) is different
    alone = module.objective(name)(sdk.Views(embeddings=(z1[:b].detach(), z2[:b].detach()))).value
    assert abs(float(alone) - float(results[0]["loss"])) > 1e-3
