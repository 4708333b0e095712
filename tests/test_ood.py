"""sdk.ood: the streaming class moments (Chan et al.'s merge, exact under any split and across
ranks), the normalised feature bank and the k-th neighbour distance."""

import os
import sys
from pathlib import Path

import torch

from sdk.ood import ClassMoments, FeatureBank, kth_neighbour_distance
from sdk.testing import run_ranks


def data(n=300, d=4, classes=3, seed=0, offset=1e4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return offset + torch.randn(classes, d, generator=g)[labels] + torch.randn(n, d, generator=g), labels


def direct(x, y):
    x = x.double()
    classes = int(y.max()) + 1
    counts = torch.bincount(y, minlength=classes).double()
    means = torch.stack([x[y == c].mean(0) for c in range(classes)])
    centred = x - means[y]
    return counts, means, centred.T @ centred


def test_moments_streamed_in_any_split_equal_the_direct_two_pass_formula():
    x, y = data()
    counts, means, scatter = direct(x, y)
    for cuts in ([300], [1, 299], [5, 100, 17, 178]):
        m, lo = ClassMoments("test"), 0
        for size in cuts:
            m.update(x[lo:lo + size], y[lo:lo + size])
            lo += size
        assert torch.equal(m.counts, counts)
        assert torch.allclose(m.means, means, rtol=1e-12)
        assert torch.allclose(m.scatter, scatter, rtol=1e-9, atol=1e-6)
        assert torch.allclose(m.covariance(), scatter / 300, rtol=1e-9, atol=1e-8)


def test_the_naive_raw_sums_would_cancel_at_this_offset():
    x, y = data(offset=1e7)
    x64 = x.double()
    naive = x64.T @ x64 - sum(torch.outer(x64[y == c].sum(0), x64[y == c].sum(0)) / (y == c).sum()
                             for c in range(3))
    _, _, scatter = direct(x, y)
    m = ClassMoments("test")
    for lo in range(0, 300, 50):
        m.update(x[lo:lo + 50], y[lo:lo + 50])
    assert (m.scatter - scatter).abs().max() < 1e-3 * scatter.abs().max()
    assert (naive - scatter).abs().max() > 1e-2 * scatter.abs().max()


def test_classes_grow_with_the_labels_and_merge_pads_them():
    x, y = data()
    a, b = ClassMoments("test"), ClassMoments("test")
    a.update(x[y < 2], y[y < 2])  # classes 0, 1
    b.update(x[y == 2], y[y == 2])  # class 2 only: 3 rows of statistics
    a.merge_(b.counts, b.means, b.scatter)
    counts, means, scatter = direct(x, y)
    assert torch.equal(a.counts, counts) and torch.allclose(a.means, means, rtol=1e-12)
    assert torch.allclose(a.scatter, scatter, rtol=1e-9, atol=1e-6)


def test_bank_normalises_and_kth_distance_chunks_alike():
    g = torch.Generator().manual_seed(0)
    bank = FeatureBank(normalize=True)
    bank.add(3 * torch.randn(40, 5, generator=g))
    assert torch.allclose(bank.rows.norm(dim=1), torch.ones(40))
    q = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1)
    full = torch.cdist(q.double(), bank.rows.double()).sort(1).values[:, 6]
    assert torch.allclose(kth_neighbour_distance(bank.rows, q, 7, chunk_size=2).double(), full, atol=1e-5)


WORKER = """
import sys, torch, sdk
from sdk import distributed
from tests.test_ood import data
distributed.init("gloo")
r = distributed.rank()
x, y = data()
mine = (y < 2) if r == 0 else (y >= 1)  # overlapping class sets, rank 1 also has class 2
shard = mine & (torch.arange(300) % 2 == r)
first, rest = shard & (torch.arange(300) < 150), shard & (torch.arange(300) >= 150)
det = sdk.create("detector", "mahalanobis").fit(x[first], y[first])  # reduced once
det.update(x[rest], y[rest])
det.finalize()  # and again: no row may count twice
torch.save(det.score(x[:20]), sys.argv[1] + f"/rank{r}.pt")
torch.distributed.destroy_process_group()
"""


def test_mahalanobis_fitted_on_two_ranks_equals_one_fit_on_the_union(tmp_path):
    import sdk

    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    run_ranks([sys.executable, "-c", WORKER, str(tmp_path)], world=2, timeout=120, cwd=root,
              env={"PYTHONPATH": path})
    x, y = data()
    parity = torch.arange(300) % 2
    union = ((y < 2) & (parity == 0)) | ((y >= 1) & (parity == 1))
    want = sdk.create("detector", "mahalanobis").fit(x[union], y[union]).score(x[:20])
    for rank in range(2):
        assert torch.allclose(torch.load(tmp_path / f"rank{rank}.pt"), want, rtol=1e-6)
