"""inductive_bias_estimate against scikit-learn's Gaussian process, scipy's noncentral
chi-squared, the analytic mean of the sampled errors, a Monte-Carlo tail frequency, the
true-vs-random-label contrast on wine, and the effect of the input dimension."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import ncx2
from sklearn.datasets import load_wine
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF
from sklearn.preprocessing import StandardScaler

import sdk
from plugins.analysis.inductive_bias_estimate import (
    fit_scaled_ncx2,
    inductive_bias_from_errors,
    interpolating_posterior,
    ncx2_log_cdf,
    sample_test_errors,
)


def task(seed=0, n=40, t=25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + t, 3, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot((x[:, 0] > 0).long(), 2).to(torch.float64)
    return x[:n], y[:n], x[n:], y[n:]


def test_posterior_matches_sklearn_gaussian_process():
    x, y, xt, _ = task()
    gp = GaussianProcessRegressor(RBF(0.7), alpha=1e-6, optimizer=None).fit(x.numpy(), y.numpy())
    mean_ref, cov_ref = gp.predict(xt.numpy(), return_cov=True)
    mean, cov = interpolating_posterior(x, y, xt, sigma=0.7, jitter=1e-6)
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(cov.numpy(), cov_ref[:, :, 0], rtol=1e-6, atol=1e-9)


def test_sampled_errors_have_the_analytic_mean():
    x, y, xt, yt = task(seed=1)
    mean, cov = interpolating_posterior(x, y, xt)
    errors = sample_test_errors(mean, cov, yt, 20000, torch.Generator().manual_seed(0))
    expected = float((mean - yt).pow(2).mean() + torch.diagonal(cov).mean())   # E(mu + R eps - y)^2
    assert float(errors.mean()) == pytest.approx(expected, rel=0.01)


def test_ncx2_log_cdf_matches_scipy_and_the_fit_matches_three_moments():
    df, nc, scale = (torch.tensor(v, dtype=torch.float64) for v in (6.0, 30.0, 0.05))
    for x in (0.5, 1.2, 2.0, 4.0):
        assert float(ncx2_log_cdf(x, df, nc, scale)) == pytest.approx(ncx2.logcdf(x, 6.0, 30.0, scale=0.05), rel=1e-9)
    e = torch.tensor(ncx2.rvs(6.0, 30.0, scale=0.05, size=50000, random_state=np.random.default_rng(0)))
    f_df, f_nc, f_s = fit_scaled_ncx2(e)
    a, b, c = e.mean(), (e - e.mean()).pow(2).mean(), (e - e.mean()).pow(3).mean()
    assert float(f_s * (f_df + f_nc)) == pytest.approx(float(a), rel=1e-10)
    assert float(2 * f_s ** 2 * (f_df + 2 * f_nc)) == pytest.approx(float(b), rel=1e-10)
    assert float(8 * f_s ** 3 * (f_df + 3 * f_nc)) == pytest.approx(float(c), rel=1e-10)
    assert float(f_nc) == pytest.approx(30.0, rel=0.3)


def test_estimate_matches_monte_carlo_tail_frequency():
    x, y, xt, yt = task(seed=2)
    errors = sample_test_errors(*interpolating_posterior(x, y, xt), yt, 20000, torch.Generator().manual_seed(1))
    for q in (0.05, 0.3):
        eps = float(torch.quantile(errors, q))
        assert float(inductive_bias_from_errors(errors, eps)) == pytest.approx(-math.log(q), rel=0.1)


def wine(labels_seed=None):
    x, y = load_wine(return_X_y=True)
    x = torch.tensor(StandardScaler().fit_transform(x)) * 2 / math.sqrt(x.shape[1])
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)[:120]
    x, y = x[perm], torch.tensor(y)[perm]
    if labels_seed is not None:
        y = y[torch.randperm(120, generator=torch.Generator().manual_seed(labels_seed))]
    return x, y


def test_defaults_stream_resume_and_true_labels_need_less_bias_than_random():
    x, y = wine()
    metric = sdk.create("metric", "inductive_bias_estimate")   # target 0.01, sigma 1, 10000 draws
    metric.fit(x[:60], y[:60])
    metric.update(x[60:90], y[60:90])
    resumed = sdk.create("metric", "inductive_bias_estimate")
    resumed.load_state_dict(metric.state_dict())
    onehot = torch.nn.functional.one_hot(y, 3).to(torch.float64)
    mean, cov = interpolating_posterior(x[:60], onehot[:60], x[60:], sigma=1.0, jitter=1e-8)
    errors = sample_test_errors(mean, cov, onehot[60:], 10000, torch.Generator().manual_seed(0))
    expected = float(inductive_bias_from_errors(errors, 0.01))
    for m in (metric, resumed):
        m.update(x[90:], y[90:])
        out = m.compute()
        assert out["inductive_bias"] == pytest.approx(expected, rel=1e-9)
        assert out["inductive_bias_bits"] == pytest.approx(expected / math.log(2), rel=1e-9)
    bias = {}
    for name, seed in (("true", None), ("random 1", 1), ("random 2", 2)):
        x, y = wine(seed)
        m = sdk.create("metric", "inductive_bias_estimate", target_error=0.3, num_samples=2000)
        m.fit(x[:60], y[:60])
        m.update(x[60:], y[60:])
        bias[name] = m.compute()["inductive_bias"]
    assert bias["true"] < 0.7 * min(bias["random 1"], bias["random 2"])


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "inductive_bias_estimate")
    with pytest.raises(sdk.errors.NotFittedError, match="inductive_bias_estimate: call fit"):
        metric.update(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
    metric.fit(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(sdk.errors.ShapeError, match="inductive_bias_estimate: test_x"):
        metric.update(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match="inductive_bias_estimate: labels of test_x"):
        metric.update(torch.randn(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(sdk.errors.ConfigError, match="target_error"):
        sdk.create("metric", "inductive_bias_estimate", target_error=0.0)


def test_a_higher_dimensional_task_needs_more_inductive_bias():
    """The paper's finding: the same labelling rule (the sign of x_1 + x_2) in 2 vs 16 input
    dimensions (inputs scaled to equal mean norm), 60 training rows. With the jitter 1e-2 as
    a noise term (at 1e-8 the exact RBF interpolant of the 2-D labels oscillates wildly)."""
    bias = {}
    for d in (2, 16):
        x = torch.randn(120, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        y = (x[:, :2].sum(1) > 0).long()
        m = sdk.create("metric", "inductive_bias_estimate", target_error=0.3, num_samples=2000, jitter=1e-2)
        m.fit(1.5 * x[:60] / math.sqrt(d), y[:60])
        m.update(1.5 * x[60:] / math.sqrt(d), y[60:])
        bias[d] = m.compute()["inductive_bias"]
    assert bias[2] < 1.0 < 10.0 < bias[16]
