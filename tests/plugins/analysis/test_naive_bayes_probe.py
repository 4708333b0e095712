"""naive_bayes_probe against scikit-learn's GaussianNB (where the shared and per-class variances
coincide), a plain per-class loop, and the logistic probe of sdk.metrics."""

import math

import numpy as np
import pytest
import torch
from sklearn.naive_bayes import GaussianNB

import sdk
from plugins.analysis.naive_bayes_probe import fit_naive_bayes
from sdk.metrics import linear_probe_accuracy


def slow_scores(x_train, y_train, x_test, eps):
    """The authors' recipe written out: per-class means and variances, shared variance = prior-
    weighted mean of the per-class variances, score = log prior - 1/2 sum (x - mu)^2 / s2."""
    classes = sorted(set(y_train.tolist()))
    n = len(y_train)
    mus, variances, priors = [], [], []
    for c in classes:
        rows = x_train[y_train == c]
        mus.append(rows.mean(0))
        variances.append(((rows - rows.mean(0)) ** 2).mean(0) + eps)
        priors.append(len(rows) / n)
    s2 = sum(p * v for p, v in zip(priors, variances))
    out = np.zeros((len(x_test), len(classes)))
    for i, x in enumerate(x_test):
        for c in range(len(classes)):
            out[i, c] = math.log(priors[c]) - 0.5 * sum((x[d] - mus[c][d]) ** 2 / s2[d] for d in range(len(x)))
    return out


def test_matches_sklearn_when_every_class_has_the_same_spread():
    g = np.random.default_rng(0)
    e = g.normal(size=(7, 4)) * np.array([0.5, 1.0, 2.0, 3.0])
    means = g.normal(size=(3, 4)) * 2
    # class c holds the residuals e tiled c + 1 times: equal per-class variances, priors 1:2:3
    x = np.concatenate([means[c] + np.tile(e, (c + 1, 1)) for c in range(3)])
    y = np.concatenate([np.full(7 * (c + 1), c) for c in range(3)])
    eps = 1e-3
    sk = GaussianNB(var_smoothing=eps / x.var(0).max()).fit(x, y)
    nb = fit_naive_bayes(torch.tensor(x), torch.tensor(y), var_epsilon=eps)
    x_test = g.normal(size=(50, 4)) * 3
    ours = nb.log_joint(torch.tensor(x_test)).log_softmax(1).numpy()
    np.testing.assert_allclose(ours, sk.predict_log_proba(x_test), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(nb.log_prior.exp().numpy(), [1 / 6, 2 / 6, 3 / 6])


def test_matches_slow_loop_with_unequal_class_spreads_and_counts():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (60,), generator=g)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)[y] * 2 + torch.randn(60, 5, generator=g, dtype=torch.float64) * (1 + y[:, None])
    x_test = torch.randn(30, 5, generator=g, dtype=torch.float64) * 3
    expected = slow_scores(x.numpy(), y.numpy(), x_test.numpy(), eps=0.01)
    ours = fit_naive_bayes(x, y, var_epsilon=0.01).log_joint(x_test).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_metric_defaults_accuracies_and_resume():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(90) % 3
    x = torch.randn(3, 6, generator=g)[y] + torch.randn(90, 6, generator=g)
    x[:, 5] = 0.25                                          # a constant feature: its variance is eps
    x_train, y_train, x_test, y_test = x[:60], y[:60], x[60:], y[60:]
    metric = sdk.create("metric", "naive_bayes_probe").fit(x_train, y_train)
    assert float(metric.nb.var[5]) == pytest.approx(1e-9, rel=1e-6)   # the authors' eps = 1e-9
    metric.update(x_test[:10], y_test[:10])
    resumed = sdk.create("metric", "naive_bayes_probe")
    resumed.load_state_dict(metric.state_dict())
    expected_nb = float((torch.tensor(slow_scores(x_train.double().numpy(), y_train.numpy(),
                                                  x_test.double().numpy(), 1e-9)).argmax(1) == y_test).double().mean())
    expected_lr = linear_probe_accuracy(x_train, y_train, x_test, y_test)   # weight_decay 1e-4
    for m in (metric, resumed):
        m.update(x_test[10:], y_test[10:])
        out = m.compute()
        assert out["naive_bayes"] == pytest.approx(expected_nb)
        assert out["logistic"] == pytest.approx(expected_lr)
    assert 0.6 < expected_nb < 1.0
    only = sdk.create("metric", "naive_bayes_probe", logistic=False).fit(x_train, y_train)
    only.update(x_test, y_test)
    assert only.compute() == {"naive_bayes": pytest.approx(expected_nb)}


def test_absent_class_is_never_predicted():
    x = torch.tensor([[0.0], [0.2], [5.0], [5.2]])
    nb = fit_naive_bayes(x, torch.tensor([0, 0, 2, 2]))
    assert nb.log_prior[1] == -math.inf
    assert set(nb.predict(torch.linspace(-3, 8, 50)[:, None]).tolist()) == {0, 2}


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "naive_bayes_probe")
    with pytest.raises(sdk.errors.NotFittedError, match="naive_bayes_probe"):
        metric.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match="naive_bayes_probe: train_emb holds NaN"):
        metric.fit(torch.tensor([[0.0], [math.nan]]), torch.tensor([0, 1]))
    metric.fit(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(sdk.errors.ShapeError, match=r"naive_bayes_probe: test_emb must be floating \[N, 2\]"):
        metric.update(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(sdk.errors.ConfigError, match="var_epsilon"):
        sdk.create("metric", "naive_bayes_probe", var_epsilon=-1.0)
