"""beta_calibration equals an unpenalised scikit-learn logistic regression on (ln s, -ln(1-s)),
applies the authors' a >= 0 / b >= 0 refit, and improves naive Bayes on held-out breast cancer."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import sdk


def features(s):
    s = np.clip(s, 1e-12, 1 - 1e-12)
    return np.stack([np.log(s), -np.log1p(-s)], 1)


def sklearn_beta(s, y):
    lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10000).fit(features(s), y)
    a, b = lr.coef_[0]
    if a < 0:
        lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10000).fit(features(s)[:, 1:], y)
        return 0.0, lr.coef_[0][0], lr.intercept_[0]
    if b < 0:
        lr = LogisticRegression(penalty=None, tol=1e-12, max_iter=10000).fit(features(s)[:, :1], y)
        return lr.coef_[0][0], 0.0, lr.intercept_[0]
    return a, b, lr.intercept_[0]


def test_equals_logistic_regression_on_breast_cancer_scores(held_out):
    z_cal, y_cal, _, _ = held_out("breast_cancer", "nb")
    p = z_cal.softmax(1)
    cal = sdk.create("calibrator", "beta_calibration").fit(p, y_cal)
    a, b, c = sklearn_beta(p[:, 1].numpy(), y_cal.numpy())
    assert np.allclose(cal.params[1].numpy(), [a, b, c], rtol=1e-4, atol=1e-4)
    s = p[:, 1].numpy()
    expected = 1 / (1 + 1 / (np.exp(c) * np.clip(s, 1e-12, 1) ** a / np.clip(1 - s, 1e-12, 1) ** b))
    assert np.allclose(cal(p)[:, 1].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("flip", [0, 1])
def test_negative_coefficient_is_refitted_at_zero(flip):
    g = torch.Generator().manual_seed(flip)
    s = torch.rand(400, generator=g, dtype=torch.float64) * 0.98 + 0.01
    # P(y = 1) rises with s but drops at one end: the free fit has a < 0 (or b < 0)
    rate = torch.where(s < 0.5, 0.6 - 0.8 * s, 0.2 + 0.8 * (s - 0.5)) if flip == 0 else \
        torch.where(s > 0.5, 0.4 + 0.8 * (1 - s), 0.8 - 0.8 * (0.5 - s))
    y = torch.bernoulli(rate, generator=g).long()
    cal = sdk.create("calibrator", "beta_calibration").fit(torch.stack([1 - s, s], 1), y)
    a, b, c = sklearn_beta(s.numpy(), y.numpy())
    assert (a == 0) == (flip == 0) and (b == 0) == (flip == 1)
    assert np.allclose(cal.params[1].numpy(), [a, b, c], atol=1e-4)


def test_improves_naive_bayes_on_held_out_breast_cancer(held_out, metrics):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out("breast_cancer", "nb")
    base = z_te.softmax(1)
    p = sdk.create("calibrator", "beta_calibration").fit(z_cal.softmax(1), y_cal)(base)
    assert nll(p, y_te) < 0.3 * nll(base, y_te) and ece(p, y_te) < 0.6 * ece(base, y_te)


def test_errors():
    cal = sdk.create("calibrator", "beta_calibration")
    with pytest.raises(sdk.NotFittedError, match="beta_calibration"):
        cal(torch.full((3, 2), 0.5))
    with pytest.raises(sdk.ShapeError, match="'beta_calibration': labels hold one class only"):
        cal.fit(torch.full((3, 2), 0.5), torch.ones(3, dtype=torch.long))
