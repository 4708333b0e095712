"""isotonic_regression equals scikit-learn's IsotonicRegression per class (ties, clipping,
interpolation), renormalises, and improves held-out digits."""

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

import sdk


def sklearn_per_class(p_fit, y_fit, p):
    return np.stack([IsotonicRegression(out_of_bounds="clip").fit(p_fit[:, c], y_fit == c).predict(p[:, c])
                     for c in range(p_fit.shape[1])], 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_sklearn_per_class(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (300,), generator=g)
    p = (1.5 * torch.nn.functional.one_hot(y, 4) + torch.randn(300, 4, generator=g, dtype=torch.float64)).softmax(1)
    p = (p * 20).round() / 20  # many ties
    p[:5] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    q = torch.rand(200, 4, generator=g, dtype=torch.float64)
    q = torch.cat([q / q.sum(1, keepdim=True), p[:50]])  # values between, on and outside the knots
    cal = sdk.create("calibrator", "isotonic_regression").fit(p, y)
    expected = sklearn_per_class(p.numpy(), y.numpy(), q.numpy())
    assert np.abs(cal.one_vs_rest(q).numpy() - expected).max() <= 1e-12
    total = expected.sum(1, keepdims=True)
    assert np.allclose(cal(q).numpy(), np.where(total > 0, expected / np.maximum(total, 1e-300), q.numpy()),
                       atol=1e-12)


def test_binary_is_class_one():
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (200,), generator=g)
    s = (torch.randn(200, generator=g, dtype=torch.float64) + 1.5 * y).sigmoid()
    p = torch.stack([1 - s, s], 1)
    cal = sdk.create("calibrator", "isotonic_regression").fit(p, y)
    g1 = IsotonicRegression(out_of_bounds="clip").fit(s.numpy(), y.numpy()).predict(s.numpy())
    assert np.abs(cal(p)[:, 1].numpy() - g1).max() <= 1e-12
    assert torch.allclose(cal(p).sum(1), torch.ones(200, dtype=torch.float64))


def test_improves_naive_bayes_on_held_out_digits(held_out, metrics):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out("digits", "nb")
    base = z_te.softmax(1)
    p = sdk.create("calibrator", "isotonic_regression").fit(z_cal.softmax(1), y_cal)(base)
    assert ece(p, y_te) < 0.5 * ece(base, y_te) and nll(p, y_te) < 0.5 * nll(base, y_te)


def test_errors():
    cal = sdk.create("calibrator", "isotonic_regression")
    with pytest.raises(sdk.NotFittedError, match="isotonic_regression"):
        cal(torch.full((3, 2), 0.5))
    nan = torch.full((3, 2), 0.5)
    nan[0, 0] = float("nan")
    with pytest.raises(sdk.ShapeError, match="'isotonic_regression': fit's scores hold NaN"):
        cal.fit(nan, torch.tensor([0, 1, 0]))
