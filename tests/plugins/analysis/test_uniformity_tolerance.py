"""uniformity_tolerance against explicit double loops, analytic values and state round trips."""

import math

import pytest
import torch

import sdk
from plugins.analysis.uniformity_tolerance import tolerance


def unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def slow(z, labels, t=2.0):
    u = [unit(v) for v in z.tolist()]
    y = labels.tolist()
    n = len(u)
    pot = [math.exp(-t * sum((a - b) ** 2 for a, b in zip(u[i], u[j])))
           for i in range(n) for j in range(i + 1, n)]
    same = [sum(a * b for a, b in zip(u[i], u[j]))
            for i in range(n) for j in range(n) if i != j and y[i] == y[j]]
    return math.log(sum(pot) / len(pot)), sum(same) / len(same)


def data(n=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)[labels] + torch.randn(n, 5, generator=g, dtype=torch.float64)
    return 3.0 * z, labels


def test_defaults_match_double_loop_streamed_and_resumed():
    z, labels = data()
    unif, tol = slow(z, labels, t=2.0)                  # the paper's t = 2 is the default
    metric = sdk.create("metric", "uniformity_tolerance")
    metric.update(z[:20], labels[:20])
    state = metric.state_dict()
    resumed = sdk.create("metric", "uniformity_tolerance")
    resumed.load_state_dict(state)
    for m in (metric, resumed):
        m.update(z[20:], labels[20:])
        out = m.compute()
        assert out["uniformity"] == pytest.approx(unif, rel=1e-10)
        assert out["tolerance"] == pytest.approx(tol, rel=1e-10)
    other = sdk.create("metric", "uniformity_tolerance", t=0.5, chunk_size=7)
    other.update(z, labels)
    assert other.compute()["uniformity"] == pytest.approx(slow(z, labels, t=0.5)[0], rel=1e-10)


def test_analytic_values():
    e = torch.eye(3, dtype=torch.float64)
    collapsed = torch.cat([e, 2 * e, 5 * e])            # each class on one point, classes orthogonal
    labels = torch.tensor([0, 1, 2] * 3)
    assert tolerance(collapsed, labels) == pytest.approx(1.0)
    antipodal = torch.tensor([[1.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -2.0]])
    assert tolerance(antipodal, torch.tensor([0, 0, 1, 1])) == pytest.approx(-1.0)
    assert tolerance(antipodal, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    assert math.isnan(tolerance(antipodal, torch.tensor([0, 1, 2, 3])))   # no same-class pair
    metric = sdk.create("metric", "uniformity_tolerance")
    metric.update(antipodal, torch.tensor([0, 0, 1, 1]))
    # pairs: two antipodal (||.||^2 = 4), four orthogonal (||.||^2 = 2)
    assert metric.compute()["uniformity"] == pytest.approx(math.log((2 * math.exp(-8) + 4 * math.exp(-4)) / 6))


def test_class_clusters_are_tolerant_and_less_uniform():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 3
    spread = torch.randn(300, 3, generator=g)
    clustered = 4 * torch.eye(3)[labels] + torch.randn(300, 3, generator=g)
    a, b = sdk.create("metric", "uniformity_tolerance"), sdk.create("metric", "uniformity_tolerance")
    a.update(spread, labels)
    b.update(clustered, labels)
    sa, sb = a.compute(), b.compute()
    assert sb["tolerance"] > 0.7 and abs(sa["tolerance"]) < 0.1
    assert sb["uniformity"] > sa["uniformity"] + 0.5


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "uniformity_tolerance")
    with pytest.raises(sdk.errors.ShapeError, match=r"uniformity_tolerance: labels"):
        metric.update(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match=r"uniformity_tolerance: z must be \[N, D\]"):
        metric.update(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.errors.ConfigError, match="t"):
        sdk.create("metric", "uniformity_tolerance", t=0.0)
