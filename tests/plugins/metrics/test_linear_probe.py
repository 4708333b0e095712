"""linear_probe against scikit-learn's LogisticRegression on digits (same objective)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import sdk
from plugins.metrics.linear_probe import fit_linear_probe, linear_probe_accuracy


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    t = lambda a, dt=torch.float32: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(x[:1000]), t(y[:1000], torch.long), t(x[1000:]), t(y[1000:], torch.long)


@pytest.mark.parametrize("weight_decay", [1e-3, 1e-1])
def test_matches_sklearn_logistic_regression(digits, weight_decay):
    x_tr, y_tr, x_te, y_te = digits
    scaler = StandardScaler().fit(x_tr.numpy())
    sk = LogisticRegression(C=1 / (weight_decay * len(y_tr)), max_iter=2000, tol=1e-6)
    sk.fit(scaler.transform(x_tr.numpy()), y_tr.numpy())
    sk_acc = sk.score(scaler.transform(x_te.numpy()), y_te.numpy())
    probe = fit_linear_probe(x_tr, y_tr, weight_decay=weight_decay)
    ours = probe.logits(x_te).softmax(1).numpy()
    assert np.abs(ours - sk.predict_proba(scaler.transform(x_te.numpy()))).max() < 0.02
    acc = linear_probe_accuracy(x_tr, y_tr, x_te, y_te, weight_decay=weight_decay)
    assert acc == pytest.approx(sk_acc, abs=0.01)
    assert acc > 0.9


def test_weight_decay_and_iterations_are_used(digits):
    x_tr, y_tr, x_te, y_te = digits
    loose = fit_linear_probe(x_tr, y_tr, weight_decay=1e-3).weight.norm()
    tight = fit_linear_probe(x_tr, y_tr, weight_decay=1.0).weight.norm()
    assert tight < 0.3 * loose
    one_step = fit_linear_probe(x_tr, y_tr, weight_decay=1e-3, max_iter=1).weight.norm()
    assert one_step < 0.5 * loose


def test_deterministic_and_streaming(digits):
    x_tr, y_tr, x_te, y_te = digits
    a = fit_linear_probe(x_tr, y_tr, weight_decay=1e-2)
    b = fit_linear_probe(x_tr, y_tr, weight_decay=1e-2)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    metric = sdk.create("metric", "linear_probe", weight_decay=1e-2)
    metric.fit(x_tr, y_tr)
    for chunk in range(0, len(y_te), 200):
        metric.update(x_te[chunk:chunk + 200], y_te[chunk:chunk + 200])
    assert metric.compute() == linear_probe_accuracy(x_tr, y_tr, x_te, y_te, weight_decay=1e-2)
