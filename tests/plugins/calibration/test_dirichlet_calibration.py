"""dirichlet_calibration: softmax(W ln p + b) at a stationary point of the ODIR objective
(gradient by hand), it improves naive Bayes on held-out digits, and ODIR beats no penalty."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def test_fit_is_a_stationary_point_on_log_probabilities():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (400,), generator=g)
    p = (2 * F.one_hot(y, 3) + 1.5 * torch.randn(400, 3, generator=g, dtype=torch.float64)).softmax(1) ** 1.5
    p = p / p.sum(1, keepdim=True)
    lam, mu = 0.2, 0.1
    cal = sdk.create("calibrator", "dirichlet_calibration", reg_lambda=lam, reg_mu=mu).fit(p, y)
    x = p.clamp_min(1e-12).log()
    q = (x @ cal.weight.T + cal.bias).softmax(1)
    r = q - F.one_hot(y, 3).double()
    off = 1 - torch.eye(3, dtype=torch.float64)
    assert (r.T @ x / 400 + 2 * lam / 6 * cal.weight * off).abs().max() < 1e-6
    assert (r.mean(0) + 2 * mu / 3 * cal.bias).abs().max() < 1e-6
    out = cal(p)
    assert torch.allclose(out, q) and torch.allclose(out.sum(1), torch.ones(400, dtype=torch.float64))
    assert torch.allclose(cal.predict_proba(p), q)  # probabilities in, probabilities out


def test_improves_naive_bayes_on_held_out_digits(held_out, metrics):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out("digits", "nb")
    odir = sdk.create("calibrator", "dirichlet_calibration", reg_lambda=1.0, reg_mu=1.0)
    p = odir.fit(z_cal.softmax(1), y_cal)(z_te.softmax(1))
    base = z_te.softmax(1)
    assert nll(p, y_te) < 0.25 * nll(base, y_te) and ece(p, y_te) < 0.35 * ece(base, y_te)


def test_rejects_logits_and_values_outside_zero_one():
    cal = sdk.create("calibrator", "dirichlet_calibration")
    y = torch.arange(10) % 2
    with pytest.raises(TypeError, match="'dirichlet_calibration' takes probabilities"):
        cal.fit(sdk.Logits(torch.randn(10, 2)), y)
    with pytest.raises(sdk.ShapeError, match=r"'dirichlet_calibration': fit's scores are probabilities "
                                              r"and must lie in \[0, 1\]"):
        cal.fit(torch.randn(10, 2), y)
