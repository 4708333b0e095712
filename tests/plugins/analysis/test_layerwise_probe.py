"""layerwise_probe: the captured representations equal a manual forward, each layer's linear probe
reproduces scikit-learn's LogisticRegression on the same features, the kNN columns equal
sdk.metrics' kNN, streaming and resume; and the paper's point on digits: a network trained on
digits 0-4 transfers to digits 5-9 better from a hidden layer than from its last layer."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

import sdk
from sdk.capture import layer_outputs
from sdk.metrics import knn_accuracy


def digits():
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def trained_mlp(x, y, classes, steps=60, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_captured_features_equal_a_manual_forward_and_names_are_checked():
    x, _ = digits()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10))
    feats = layer_outputs(mlp, x[:50], ["3", "1", ""], "layerwise_probe")
    assert list(feats) == ["3", "1", ""]
    assert torch.equal(feats["1"], mlp[:2](x[:50]))
    assert torch.equal(feats["3"], mlp[:4](x[:50]))
    assert torch.equal(feats[""], mlp(x[:50]))
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 10))
    images = x[:7].reshape(7, 1, 8, 8)
    assert torch.equal(layer_outputs(conv, images, ["1"], "layerwise_probe")["1"], conv[:2](images).reshape(7, 108))
    with pytest.raises(sdk.ConfigError, match=r"layerwise_probe: the model has no layer named '5'.*"
                                              r"Available: '0', '1', '2', '3', '4'"):
        layer_outputs(mlp, x[:5], ["1", "5"], "layerwise_probe")


def test_each_layer_reproduces_sklearn_logistic_regression_and_the_knn_of_sdk_metrics():
    x, y = digits()
    train, test = slice(0, 1000), slice(1000, None)
    model = trained_mlp(x[train], y[train], 10)
    names = ("1", "3", "4")
    tr, te = (layer_outputs(model, x[s], names, "layerwise_probe") for s in (train, test))
    metric = sdk.create("metric", "layerwise_probe", layers=names)
    assert (metric.weight_decay, metric.max_iter, metric.k, metric.temperature) == (1e-4, 1000, 20, 0.07)
    metric.fit(y[train], *tr.values())
    metric.update(y[test], *te.values())
    out = metric.compute()
    assert sorted(out) == sorted([f"linear_probe@{n}" for n in names] + [f"knn@{n}" for n in names])
    for n in names:
        scaler = StandardScaler().fit(tr[n].numpy())
        ref = LogisticRegression(C=1 / (1e-4 * 1000), max_iter=5000).fit(scaler.transform(tr[n].numpy()), y[train].numpy())
        sk = ref.score(scaler.transform(te[n].numpy()), y[test].numpy())
        assert out[f"linear_probe@{n}"] == pytest.approx(sk, abs=0.02), n
        assert out[f"knn@{n}"] == pytest.approx(knn_accuracy(tr[n], y[train], te[n], y[test]), abs=1e-12), n
    strong = sdk.create("metric", "layerwise_probe", weight_decay=1.0, k=200, temperature=1.0)
    strong.fit(y[train], tr["3"])
    strong.update(y[test], te["3"])
    out = strong.compute()
    scaler = StandardScaler().fit(tr["3"].numpy())
    ref = LogisticRegression(C=1 / (1.0 * 1000), max_iter=5000).fit(scaler.transform(tr["3"].numpy()), y[train].numpy())
    assert out["linear_probe@0"] == pytest.approx(ref.score(scaler.transform(te["3"].numpy()), y[test].numpy()), abs=0.02)
    assert out["knn@0"] == pytest.approx(knn_accuracy(tr["3"], y[train], te["3"], y[test], k=200, temperature=1.0), abs=1e-12)


def test_streams_resumes_names_layers_and_rejects_bad_input():
    labels, low, high = sdk.create("metric", "layerwise_probe").example_inputs(60, torch.Generator().manual_seed(3))
    whole = sdk.create("metric", "layerwise_probe")
    whole.fit(labels[:40], low[:40], high[:40])
    whole.update(labels[40:], low[40:], high[40:])
    assert sorted(whole.compute()) == ["knn@0", "knn@1", "linear_probe@0", "linear_probe@1"]
    parts = sdk.create("metric", "layerwise_probe")
    parts.fit(labels[:40], low[:40], high[:40])
    parts.update(labels[40:50], low[40:50], high[40:50])
    resumed = sdk.create("metric", "layerwise_probe")
    resumed.load_state_dict(parts.state_dict())
    for m in (parts, resumed):
        m.update(labels[50:], low[50:], high[50:])
        assert m.compute() == pytest.approx(whole.compute(), abs=1e-12)
    metric = sdk.create("metric", "layerwise_probe", layers=("backbone", "head"))
    with pytest.raises(sdk.errors.NotFittedError, match="layerwise_probe: call fit"):
        metric.update(labels, low, high)
    with pytest.raises(sdk.ShapeError, match="features of 1 layers for the 2 layers"):
        metric.fit(labels, low)
    with pytest.raises(sdk.ShapeError, match="labels of features of layer 'head' must be"):
        metric.fit(labels, low, high[:-1])
    metric.fit(labels, low, high)
    with pytest.raises(sdk.ShapeError, match=r"widths \[4, 8\]; fit's were \[8, 4\]"):
        metric.update(labels, high, low)
    with pytest.raises(sdk.ShapeError, match="features of layer 'backbone' holds NaN"):
        metric.fit(labels, torch.full_like(low, float("nan")), high)
    with pytest.raises(sdk.ConfigError, match="names a layer twice"):
        sdk.create("metric", "layerwise_probe", layers=("a", "a"))
    with pytest.raises(sdk.ConfigError, match="k must be >= 1"):
        sdk.create("metric", "layerwise_probe", k=0)


def test_a_hidden_layer_transfers_to_new_classes_better_than_the_last_layer():
    """Pretrain on digits 0-4 (cross-entropy), probe on 5-9: the last layer's 5 class scores are
    specialised to the pretraining task; the hidden layers keep more of what 5-9 need (measured:
    linear probe 0.92 / 0.75 / 0.60 and kNN 0.80 / 0.68 / 0.56 at layers 1 / 3 / 4; over seeds
    0-3 layer 1 beats layer 4 by at least 0.27 (probe) and 0.27 (kNN))."""
    x, y = digits()
    old, new = y < 5, y >= 5
    model = trained_mlp(x[old], y[old], 5)
    xn, yn = x[new], y[new] - 5
    half = xn.shape[0] // 2
    names = ("1", "3", "4")
    tr, te = (layer_outputs(model, part, names, "layerwise_probe") for part in (xn[:half], xn[half:]))
    metric = sdk.create("metric", "layerwise_probe", layers=names)
    metric.fit(yn[:half], *tr.values())
    metric.update(yn[half:], *te.values())
    out = metric.compute()
    assert out["linear_probe@1"] > out["linear_probe@4"] + 0.05
    assert out["knn@1"] > out["knn@4"] + 0.05
