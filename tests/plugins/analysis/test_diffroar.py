"""diffroar on synthetic data whose discriminative coordinates are known per instance (a signal
block at a random one of two positions, as in BlockMNIST): the oracle attribution scores high,
a random one near zero, the inverted oracle below zero; the masking against a per-row loop."""

import math

import pytest
import torch

import sdk
from plugins.analysis.diffroar import keep_mask
from sdk.metrics import linear_probe_accuracy


def blocks(n, seed, block=4, mu=1.5):
    """Two blocks of ``block`` features; the class (+-mu) sits in one chosen at random per row,
    the other is noise. Returns x, the oracle attribution (1 on the signal block), labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2 * block, generator=g, dtype=torch.float64)
    oracle = torch.zeros(n, 2 * block, dtype=torch.float64)
    for i in range(n):
        cols = slice(block * int(where[i]), block * (int(where[i]) + 1))
        x[i, cols] += mu * (2 * int(y[i]) - 1)
        oracle[i, cols] = 1.0
    return x, oracle + 0.01 * torch.rand(n, 2 * block, generator=g, dtype=torch.float64), y


def slow_masked(x, attributions, k, top, fill):
    out = x.clone()
    d = x.shape[1]
    n_mask = round((1 - k) * d)                        # the authors' start_idx
    for i in range(x.shape[0]):
        by_importance = sorted(range(d), key=lambda j: -abs(float(attributions[i, j])) if top
                               else abs(float(attributions[i, j])))
        for j in by_importance[d - n_mask:]:
            out[i, j] = fill[j]
    return out


def run(levels, train, test, attribution):
    metric = sdk.create("metric", "diffroar", levels=levels)
    metric.fit(train[0], attribution(train), train[2])
    metric.update(test[0], attribution(test), test[2])
    return metric.compute()


def test_oracle_random_and_inverted_attributions():
    train, test = blocks(300, 0), blocks(300, 1)
    g = torch.Generator().manual_seed(2)
    oracle = run((0.5,), train, test, lambda d: d[1])["diffroar@0.5"]
    rand = run((0.5,), train, test, lambda d: torch.rand(d[1].shape, generator=g, dtype=torch.float64))["diffroar@0.5"]
    inverted = run((0.5,), train, test, lambda d: 1 / d[1])["diffroar@0.5"]
    assert oracle > 0.3 and abs(rand) < 0.1 and inverted < -0.3


def test_matches_per_row_loop_and_defaults():
    train, test = blocks(120, 3), blocks(80, 4)
    metric = sdk.create("metric", "diffroar")
    assert metric.levels == (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert metric.weight_decay == 1e-4
    fill = train[0].mean(0)
    for k in (0.3, 0.55):                 # 8 features: keep 2, then 4 (round(3.6) = 4 masked)
        expected = []
        for top in (True, False):
            mtr, mte = (slow_masked(d[0], d[1], k, top, fill) for d in (train, test))
            expected.append(linear_probe_accuracy(mtr, train[2], mte, test[2]))
        out = run((k,), train, test, lambda d: d[1])
        assert out[f"diffroar@{k:g}"] == pytest.approx(expected[0] - expected[1], abs=1e-12)
        assert out["diffroar"] == out[f"diffroar@{k:g}"]
    strong = sdk.create("metric", "diffroar", levels=(0.3,), weight_decay=1.0, max_iter=50)
    strong.fit(*train)
    strong.update(*test)
    expected = [linear_probe_accuracy(slow_masked(train[0], train[1], 0.3, top, fill), train[2],
                                      slow_masked(test[0], test[1], 0.3, top, fill), test[2],
                                      weight_decay=1.0, max_iter=50) for top in (True, False)]
    assert strong.compute()["diffroar"] == pytest.approx(expected[0] - expected[1], abs=1e-12)
    assert keep_mask(torch.tensor([[3.0, -5.0, 1.0, 0.0]]), 0.5).tolist() == [[True, True, False, False]]
    assert keep_mask(torch.tensor([[3.0, -5.0, 1.0, 0.0]]), 0.5, top=False).tolist() == [[False, False, True, True]]
    assert keep_mask(torch.ones(1, 5), 0.5).sum() == 3          # the authors mask round(2.5) = 2
    assert keep_mask(torch.ones(1, 20), 0.05).sum() == 1 and keep_mask(torch.ones(1, 20), 1.0).all()


def test_streaming_resume_and_mean_over_levels():
    train, test = blocks(100, 5), blocks(60, 6)
    metric = sdk.create("metric", "diffroar", levels=(0.25, 0.75))
    metric.fit(train[0], train[1], train[2])
    metric.update(test[0][:30], test[1][:30], test[2][:30])
    resumed = sdk.create("metric", "diffroar", levels=(0.25, 0.75))
    resumed.load_state_dict(metric.state_dict())
    for m in (metric, resumed):
        m.update(test[0][30:], test[1][30:], test[2][30:])
    out, again = metric.compute(), resumed.compute()
    assert out == again
    assert out["diffroar"] == pytest.approx((out["diffroar@0.25"] + out["diffroar@0.75"]) / 2)
    assert math.isnan(sdk.create("metric", "diffroar").compute()["diffroar"])
    bad = test[0].clone()
    bad[0, 0] = math.nan                                        # not measured as a number
    metric.update(bad, test[1], test[2])
    assert all(math.isnan(v) for v in metric.compute().values())


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "diffroar")
    x, a, y = torch.randn(4, 3), torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(sdk.errors.NotFittedError, match="diffroar"):
        metric.update(x, a, y)
    with pytest.raises(sdk.errors.ShapeError, match=r"diffroar: attributions of train_x must be floating \[4, 3\]"):
        metric.fit(x, a[:, :2], y)
    with pytest.raises(sdk.errors.ShapeError, match="diffroar: train_x holds NaN"):
        metric.fit(torch.full((4, 3), math.nan), a, y)
    metric.fit(x, a, y)
    with pytest.raises(sdk.errors.ShapeError, match=r"diffroar: test_x must be \[N, 3\]"):
        metric.update(torch.randn(2, 5), torch.rand(2, 5), y[:2])
    with pytest.raises(sdk.errors.ConfigError, match="levels"):
        sdk.create("metric", "diffroar", levels=(0.5, 1.5))
