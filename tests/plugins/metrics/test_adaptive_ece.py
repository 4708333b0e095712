"""adaptive_ece against the exact equal-mass ECE (numpy sort and array_split) within its
stated error bound, the edge cases, streaming, and a 2-rank gloo reduction of the streaming
metrics equal to one process."""

import os
import sys
import textwrap

import numpy as np
import pytest
import torch

import sdk
from plugins.metrics.adaptive_ece import adaptive_ece
from sdk.testing import run_ranks


def exact_adaptive_ece(probs, labels, n_bins=15):
    conf, pred = probs.max(1).values.numpy(), probs.argmax(1).numpy()
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for b in np.array_split(order, n_bins):
        if len(b):
            total += len(b) / len(conf) * abs((pred[b] == labels.numpy()[b]).mean() - conf[b].mean())
    return total


def sample(seed, n, c=5, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    probs = (sharp * torch.randn(n, c, generator=g, dtype=torch.float64)).softmax(1)
    return probs, torch.multinomial((probs / 0.7).softmax(1), 1, generator=g).squeeze(1)


@pytest.mark.parametrize("seed, n, n_bins", [(0, 2000, 15), (1, 997, 10), (2, 50, 15)])
def test_within_its_bound_of_the_exact_equal_mass_ece(seed, n, n_bins):
    probs, labels = sample(seed, n)
    metric = sdk.create("metric", "adaptive_ece", n_bins=n_bins)
    metric.update(probs, labels)
    exact = exact_adaptive_ece(probs, labels, n_bins)
    assert abs(metric.compute() - exact) <= metric.error_bound() + 1e-12
    assert metric.error_bound() <= 2 * (n_bins - 1) / n  # at most one row per cut, distinct values
    assert metric.compute() == pytest.approx(adaptive_ece(probs, labels, n_bins), abs=1e-12)
    coarse = sdk.create("metric", "adaptive_ece", n_bins=n_bins, fine_bins=20)
    coarse.update(probs, labels)
    assert abs(coarse.compute() - exact) <= coarse.error_bound() + 1e-12
    assert coarse.error_bound() > metric.error_bound()  # the bound is not vacuous


def test_edges_single_sample_and_empty_bins():
    one = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # confidence exactly 1: the last fine bin
    assert adaptive_ece(one, torch.tensor([0])) == 0.0
    assert adaptive_ece(one, torch.tensor([1])) == 1.0
    # 3 rows, 15 bins: 12 equal-mass bins are empty and add nothing; each row its own bin
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0])
    assert adaptive_ece(probs, labels) == pytest.approx((0.9 + 0.3 + 0.5) / 3, abs=1e-12)
    assert adaptive_ece(probs, labels) == pytest.approx(exact_adaptive_ece(probs, labels), abs=1e-12)
    # 3 rows into 2 bins: numpy.array_split sizes (2, 1); no fine bin is cut, so exact
    m = sdk.create("metric", "adaptive_ece", n_bins=2)
    m.update(probs, labels)
    assert m.error_bound() == 0.0
    assert m.compute() == pytest.approx(exact_adaptive_ece(probs, labels, 2), abs=1e-12)
    assert np.isnan(sdk.create("metric", "adaptive_ece").compute())


def test_streaming_equals_one_shot():
    probs, labels = sample(3, 600)
    m = sdk.create("metric", "adaptive_ece")
    for chunk in range(0, 600, 77):
        m.update(probs[chunk:chunk + 77], labels[chunk:chunk + 77])
    assert m.compute() == pytest.approx(adaptive_ece(probs, labels), abs=1e-12)
    fresh = sdk.create("metric", "adaptive_ece")
    fresh.load_state_dict(m.state_dict())
    assert fresh.compute() == m.compute()


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import sdk
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(301, 4, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.randint(0, 4, (301,), generator=g)
    sets = probs > 0.2
    rows = slice(0, 120) if rank == 0 else slice(120, 301)  # unequal shards
    out = {}
    for name in ("adaptive_ece", "aurc", "ece", "set_coverage", "set_size"):
        m = sdk.create("metric", name)
        m.update(sets[rows] if name.startswith("set") else probs[rows], labels[rows])
        out[name] = m.compute()
    torch.save(out, sys.argv[1] + f"/rank{rank}.pt")
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    run_ranks([sys.executable, "-c", WORKER, str(tmp_path)], world=2, timeout=120,
              env={"PYTHONPATH": path})
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(0)
    probs = (3 * torch.randn(301, 4, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.randint(0, 4, (301,), generator=g)
    for name, value in ranks[0].items():
        m = sdk.create("metric", name)
        m.update(probs > 0.2 if name.startswith("set") else probs, labels)
        assert value == ranks[1][name] == pytest.approx(m.compute(), abs=1e-12), name
