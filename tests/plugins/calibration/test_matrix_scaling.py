"""matrix_scaling: the fitted (W, b) is a stationary point of the ODIR objective (its gradient
written out by hand), ODIR helps on real held-out data, the fit is deterministic."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def noisy_logits(seed, n=400, c=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = 3 * F.one_hot(y, c) + 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return z @ torch.randn(c, c, generator=g, dtype=torch.float64) * 0.7, y


def odir_gradient(z, y, w, b, lam, mu):
    """d/dW, d/db of mean NLL + lam/(C(C-1)) sum_{j!=k} W_jk^2 + mu/C sum b^2, by hand."""
    n, c = z.shape
    r = (z @ w.T + b).softmax(1) - F.one_hot(y, c).double()
    off = 1 - torch.eye(c, dtype=torch.float64)
    return r.T @ z / n + 2 * lam / (c * (c - 1)) * w * off, r.mean(0) + 2 * mu / c * b


@pytest.mark.parametrize("lam, mu", [(0.0, 0.0), (0.5, 0.0), (0.3, 2.0)])
def test_fit_is_a_stationary_point_of_the_odir_objective(lam, mu):
    z, y = noisy_logits(0)
    cal = sdk.create("calibrator", "matrix_scaling", reg_lambda=lam, reg_mu=mu).fit(z, y)
    gw, gb = odir_gradient(z, y, cal.weight, cal.bias, lam, mu)
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    assert not torch.allclose(cal.weight, torch.eye(4, dtype=torch.float64), atol=1e-2)
    assert torch.allclose(cal(z), z @ cal.weight.T + cal.bias)
    # the penalties bite: stronger lambda shrinks the off-diagonal, stronger mu the bias
    strong = sdk.create("calibrator", "matrix_scaling", reg_lambda=lam + 50, reg_mu=mu + 50).fit(z, y)
    off = ~torch.eye(4, dtype=torch.bool)
    assert strong.weight[off].norm() < cal.weight[off].norm()
    assert strong.bias.norm() < cal.bias.norm() or mu == 0 and cal.bias.norm() < 1e-9


def test_odir_beats_unregularised_matrix_scaling_on_held_out_digits(held_out, metrics):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out("digits", "logistic")
    plain = sdk.create("calibrator", "matrix_scaling").fit(z_cal, y_cal)
    odir = sdk.create("calibrator", "matrix_scaling", reg_lambda=1.0, reg_mu=1.0).fit(z_cal, y_cal)
    p_plain, p_odir = plain.predict_proba(z_te), odir.predict_proba(z_te)
    assert nll(p_odir, y_te) < 0.5 * nll(p_plain, y_te)  # 110 free parameters on 539 rows overfit
    assert ece(p_odir, y_te) < ece(p_plain, y_te)


def test_reduces_nll_and_ece_of_naive_bayes_on_digits(held_out, metrics):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out("digits", "nb")
    p = sdk.create("calibrator", "matrix_scaling", reg_lambda=1.0, reg_mu=1.0).fit(z_cal, y_cal).predict_proba(z_te)
    base = z_te.softmax(1)
    assert nll(p, y_te) < 0.3 * nll(base, y_te) and ece(p, y_te) < 0.5 * ece(base, y_te)


def test_deterministic_and_errors():
    z, y = noisy_logits(1)
    a = sdk.create("calibrator", "matrix_scaling", reg_lambda=0.1).fit(z, y)
    b = sdk.create("calibrator", "matrix_scaling", reg_lambda=0.1).fit(z, y)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    cal = sdk.create("calibrator", "matrix_scaling")
    with pytest.raises(sdk.NotFittedError, match="'matrix_scaling': call fit"):
        cal(z)
    with pytest.raises(sdk.ShapeError, match="'matrix_scaling': labels hold one class only"):
        cal.fit(z, torch.zeros_like(y))
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(sdk.ShapeError, match="'matrix_scaling': fit's scores hold NaN"):
        cal.fit(bad, y)
    with pytest.raises(sdk.ShapeError, match=r"labels must lie in \[0, 4\)"):
        cal.fit(z, y + 1)
    cal.fit(z, y)
    with pytest.raises(sdk.ShapeError, match="has 3 classes .* fitted on 4"):
        cal(z[:, :3])
    with pytest.raises(sdk.ConfigError, match="reg_lambda"):
        sdk.create("calibrator", "matrix_scaling", reg_lambda=-1.0)
