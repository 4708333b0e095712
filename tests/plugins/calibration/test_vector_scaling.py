"""vector_scaling: the fit is a stationary point of the NLL (gradient by hand), it improves a
badly calibrated classifier on held-out digits, and it is deterministic."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def test_fit_is_a_stationary_point_of_the_nll():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (500,), generator=g)
    z = (4 * F.one_hot(y, 5) + 2 * torch.randn(500, 5, generator=g, dtype=torch.float64)) * torch.tensor(
        [0.5, 1.0, 2.0, 3.0, 0.8], dtype=torch.float64) + torch.tensor([1.0, -1, 0, 2, 0], dtype=torch.float64)
    cal = sdk.create("calibrator", "vector_scaling").fit(z, y)
    r = (z * cal.weight + cal.bias).softmax(1) - F.one_hot(y, 5).double()
    assert (r * z).mean(0).abs().max() < 1e-5 and r.mean(0).abs().max() < 1e-5  # d/dw, d/db
    assert cal.weight.std() > 0.1  # the classes got different scales
    assert torch.allclose(cal(z), z * cal.weight + cal.bias)
    again = sdk.create("calibrator", "vector_scaling").fit(z, y)
    assert torch.equal(again.weight, cal.weight) and torch.equal(again.bias, cal.bias)


def test_improves_naive_bayes_on_held_out_digits(held_out, metrics):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out("digits", "nb")
    p = sdk.create("calibrator", "vector_scaling").fit(z_cal, y_cal).predict_proba(z_te)
    base = z_te.softmax(1)
    assert nll(p, y_te) < 0.3 * nll(base, y_te) and ece(p, y_te) < 0.5 * ece(base, y_te)


def test_errors_name_the_calibrator():
    z, y = torch.randn(20, 3), torch.arange(20) % 3
    cal = sdk.create("calibrator", "vector_scaling")
    with pytest.raises(sdk.ShapeError, match="'vector_scaling': labels hold one class only"):
        cal.fit(z, torch.ones_like(y))
    with pytest.raises(sdk.ShapeError, match="'vector_scaling': fit's scores hold NaN or inf"):
        cal.fit(z.index_fill(0, torch.tensor([2]), float("inf")), y)
    with pytest.raises(TypeError, match="'vector_scaling' takes logits"):
        cal.fit(sdk.Probabilities(z.softmax(1)), y)
