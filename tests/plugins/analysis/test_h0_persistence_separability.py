"""h0_persistence_separability against a slow Kruskal loop and scipy's single linkage, the rise of
S with the distance between classes, and the label-free stopping rule on a scripted run."""

import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage

import sdk
from plugins.analysis.h0_persistence_separability import h0_persistence, h0_separability


def kruskal(points):
    """Minimum spanning tree edge lengths by Kruskal's algorithm with a union-find, ascending:
    the death times of the H0 bars (components merge at the length of the edge joining them)."""
    n = len(points)

    def dist(a, b):
        return math.sqrt(sum((u - v) ** 2 for u, v in zip(points[a], points[b])))

    edges = sorted((dist(i, j), i, j) for i in range(n) for j in range(i + 1, n))
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    merges = []
    for length, i, j in edges:
        a, b = root(i), root(j)
        if a != b:
            parent[a] = b
            merges.append(length)
    return merges


def blobs(distance, seed, n=100, classes=2, dim=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    directions = torch.cat([torch.eye(dim), -torch.eye(dim)])[:classes]
    return torch.randn(n, dim, generator=g, dtype=torch.float64) + distance * directions[labels]


def test_persistence_is_the_spanning_tree_of_kruskal_and_single_linkage():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5])
    unit = torch.nn.functional.normalize(z, dim=1)
    for given, normalize, rows in ((z, False, z), (unit, False, unit), (z, True, unit)):
        p = h0_persistence(given, normalize=normalize)
        assert p.shape == (39,)
        assert p.tolist() == pytest.approx(kruskal(rows.tolist()), rel=1e-12)
        heights = np.sort(linkage(rows.numpy(), method="single")[:, 2])
        assert np.allclose(p.numpy(), heights, rtol=1e-12, atol=0)
    assert h0_persistence(z[:1]).numel() == 0


def test_score_is_one_minus_mean_normalised_persistence_and_invariant_to_scale_and_rotation():
    z = blobs(3.0, seed=1, n=30)
    p = kruskal(torch.nn.functional.normalize(z, dim=1).tolist())
    expected = 1 - sum(v / max(p) for v in p) / len(p)
    metric = sdk.create("metric", "h0_persistence_separability")
    metric.update(z[:11])
    resumed = sdk.create("metric", "h0_persistence_separability")
    resumed.load_state_dict(metric.state_dict())
    for m in (metric, resumed):
        m.update(z[11:])
        out = m.compute()
        assert out["separability"] == pytest.approx(expected, rel=1e-12)
        assert out["mean_normalized_persistence"] == pytest.approx(1 - expected, rel=1e-12)
        assert out["max_persistence"] == pytest.approx(max(p), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    raw = sdk.create("metric", "h0_persistence_separability", normalize=False)
    raw.update(7.0 * z @ q)                            # no L2 normalisation: S is scale invariant
    p_raw = kruskal(z.tolist())
    assert raw.compute()["separability"] == pytest.approx(1 - sum(v / max(p_raw) for v in p_raw) / len(p_raw))
    assert h0_separability(-3.0 * z @ q) == pytest.approx(expected, rel=1e-10)
    assert math.isnan(h0_separability(torch.ones(4, 3)))  # all rows equal: no scale


def test_separability_rises_monotonically_with_the_distance_between_classes():
    for classes in (2, 3):
        for seed in range(3):
            s = [h0_separability(blobs(d, seed, classes=classes)) for d in (3.0, 6.0, 12.0, 24.0)]
            assert all(a < b for a, b in zip(s, s[1:])), (classes, seed, s)
    assert h0_separability(blobs(24.0, 0)) > 0.9 > 0.5 > h0_separability(blobs(0.0, 0))


class _Scripted(torch.nn.Module):
    """Outputs two classes of the probe rows ``distances[k]`` apart at the k-th evaluation."""

    def __init__(self, distances):
        super().__init__()
        self.distances, self.calls = list(distances), 0

    def forward(self, x):
        d = self.distances[self.calls]
        self.calls += 1
        return x + d * (2 * (torch.arange(x.shape[0]) % 2)[:, None] - 1) * torch.eye(x.shape[1])[0]


def test_callback_stops_after_patience_evaluations_without_improvement():
    class Trainer:
        should_stop = False

    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    distances = [2.0, 4.0, 8.0, 8.0, 7.0, 5.0, 16.0]    # a tie with the best is no improvement
    callback = sdk.create("callback", "h0_persistence_separability", probe_size=40, every=2)
    assert (callback.patience, callback.normalize) == (3, True)       # the defaults
    state = sdk.events.State(trainer=Trainer(), model=_Scripted(distances))
    for start in (0, 25):                           # two batches: the probe is the first 40 rows
        state.x = x[start:start + 25]
        callback.after_forward(state)
    stops = []
    for epoch in range(12):
        state.epoch = epoch
        callback.on_epoch_end(state)
        stops.append(state.trainer.should_stop)
    probe = torch.cat([x[:25], x[25:40]])
    expected = [h0_separability(_Scripted([d])(probe)) for d in distances[:6]]
    assert [e for e, _ in callback.history[:6]] == [1, 3, 5, 7, 9, 11]
    assert [s for _, s in callback.history] == pytest.approx(expected, rel=1e-12)
    # best at the third evaluation (epoch 5), equalled at the fourth: the stop comes at epoch 11
    assert stops == [False] * 11 + [True]
    restored = sdk.create("callback", "h0_persistence_separability")
    restored.load_state_dict(callback.state_dict())
    assert (restored.best, restored.stale, restored.history) == (callback.best, 3, callback.history)
    assert torch.equal(restored.state_dict()["probe_x"], probe)


def test_callback_in_a_trainer_run_resumes_exactly(tmp_path):
    from sdk.testing import check_resume

    def stopper():
        return [sdk.create("callback", "h0_persistence_separability", probe_size=16, patience=1)]

    runs = check_resume(objective=lambda: sdk.create("objective", "cross_entropy"),
                        tmp_dir=tmp_path, callbacks=stopper, steps=15, num_samples=16)
    straight, resumed = runs.straight.callbacks[0], runs.resumed.callbacks[0]
    assert straight.history == resumed.history and len(straight.history) == 2
    # S fell at the second epoch's end: patience 1 stopped both runs there, before step 15
    assert straight.history[1][1] < straight.history[0][1]
    assert runs.straight.should_stop and runs.straight.state.step == runs.resumed.state.step == 4
    model = runs.straight.encoder.eval()
    with torch.no_grad():
        last = h0_separability(model(straight.state_dict()["probe_x"]))
    assert straight.history[-1][1] == pytest.approx(last, rel=1e-9)


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "h0_persistence_separability")
    with pytest.raises(sdk.errors.ShapeError, match=r"h0_persistence_separability: z must be \[N, D\]"):
        metric.update(torch.randn(4))
    with pytest.raises(sdk.errors.ShapeError, match="h0_persistence_separability: z must be floating"):
        metric.update(torch.ones(4, 2, dtype=torch.long))
    metric.update(torch.randn(4, 3))
    with pytest.raises(sdk.errors.ShapeError, match="width 3"):
        metric.update(torch.randn(4, 2))
    with pytest.raises(sdk.errors.ConfigError, match="patience"):
        sdk.create("callback", "h0_persistence_separability", patience=0)
    assert math.isnan(h0_separability(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]])))
