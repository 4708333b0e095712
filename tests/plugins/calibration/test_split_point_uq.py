"""split_point_uq: on synthetic heteroscedastic regression the aleatoric MAR tracks the true
noise scale and the default 0.95 intervals cover 95%; every output column equals a slow
per-row loop; the split-point identity (SDS = 0 for residuals centred on the prediction); the
epistemic SDS flags the region where the regressor is biased; bad input is refused by name."""

import math

import numpy as np
import pytest
import torch

import sdk
from plugins.calibration.split_point_uq import interval_factors, self_consistency, split_point_stats


def heteroscedastic(n, seed, bias=0.0):
    """``y = sin x + sigma(x) eps``, ``sigma = 0.1 + 0.4 |x|``; the regressor predicts ``sin x``
    (plus ``bias`` where ``x > 1``). Returns scores ``[n, 2]`` (v, x), y, sigma, x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3
    sigma = 0.1 + 0.4 * x.abs()
    y = torch.sin(x) + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    v = torch.sin(x) + bias * (x > 1)
    return torch.stack([v, x], dim=1), y, sigma, x


def test_aleatoric_tracks_the_true_noise_scale_and_intervals_cover():
    cal = sdk.create("calibrator", "split_point_uq")
    assert (cal.coverage, cal.neighbours, cal.calibrate_intervals) == (0.95, 50, True)
    scores, y = heteroscedastic(3000, 0)[:2]
    test, y_test, sigma, _ = heteroscedastic(1000, 1)
    out = cal.fit(scores, y)(test)
    corr = float(torch.corrcoef(torch.stack([out[:, 3], sigma]))[0, 1])
    assert corr > 0.9
    # a Gaussian's MAR is sigma sqrt(2 / pi)
    assert float((out[:, 3] / (sigma * math.sqrt(2 / math.pi))).median()) == pytest.approx(1, abs=0.1)
    covered = ((y_test >= out[:, 1]) & (y_test <= out[:, 2])).double().mean()
    assert float(covered) == pytest.approx(0.95, abs=0.04)  # quantiles of ~25 residuals a side
    lower = sdk.create("calibrator", "split_point_uq", coverage=0.8).fit(scores, y)(test)
    covered = ((y_test >= lower[:, 1]) & (y_test <= lower[:, 2])).double().mean()
    assert float(covered) == pytest.approx(0.8, abs=0.04)
    assert torch.equal(out[:, 0], test[:, 0])


def slow_outputs(scores, y, test, k, coverage):
    x = scores[:, 1:].numpy()
    mu, sd = x.mean(0), x.std(0, ddof=1)
    xs, ts = (x - mu) / sd, (test[:, 1:].numpy() - mu) / sd
    r = (y - scores[:, 0]).numpy()
    rows = []
    for i in range(len(ts)):
        dist = [float(np.sqrt(((ts[i] - xs[j]) ** 2).sum())) for j in range(len(xs))]
        near = [r[j] for j in sorted(range(len(xs)), key=lambda j: dist[j])[:k]]
        ups = [a for a in near if a > 0]
        downs = [-a for a in near if a < 0]
        mar = sum(abs(a) for a in near) / len(near)
        mu_up, mu_down = sum(ups) / len(ups), sum(downs) / len(downs)
        q_up, q_down = np.quantile(ups, coverage), np.quantile(downs, coverage)
        d_up = max(1.0, mar * mu_down / ((2 * mu_down - mar) * mu_up))
        d_down = max(1.0, mar * mu_up / ((2 * mu_up - mar) * mu_down))
        sds = abs(2 * mu_up * mu_down - mar * (mu_up + mu_down))
        v = float(test[i, 0])
        rows.append([v, v - q_down * d_down, v + q_up * d_up, mar, sds])
    return torch.tensor(rows, dtype=torch.float64)


def test_every_column_equals_a_slow_loop():
    g = torch.Generator().manual_seed(12)
    scores, y = heteroscedastic(300, 2, bias=0.5)[:2]
    test = heteroscedastic(40, 3, bias=0.5)[0]
    # a second covariate on another scale: neighbours are found in standardised covariates
    scores, test = (torch.cat([a, 5 * torch.randn(len(a), 1, generator=g, dtype=torch.float64)], 1)
                    for a in (scores, test))
    cal = sdk.create("calibrator", "split_point_uq", neighbours=25, coverage=0.9).fit(scores, y)
    torch.testing.assert_close(cal(test), slow_outputs(scores, y, test, 25, 0.9))


def test_the_split_point_identity():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(200, 31, generator=g, dtype=torch.float64).pow(3)  # skewed, any shape
    centred = r - r.mean(dim=1, keepdim=True)  # the prediction is the (sample) mean
    mar, up, down, *_ = split_point_stats(centred)
    torch.testing.assert_close(mar, 2 * up * down / (up + down))
    assert float(self_consistency(mar, up, down).abs().max()) < 1e-12
    d_up, d_down = interval_factors(mar, up, down)
    torch.testing.assert_close(d_up, torch.ones_like(d_up))
    torch.testing.assert_close(d_down, torch.ones_like(d_down))
    scale = centred.abs().mean(dim=1, keepdim=True)
    shifted = split_point_stats(centred + 0.5 * scale)[:3]  # a biased prediction breaks it
    assert float((self_consistency(*shifted) / scale[:, 0] ** 2).median()) > 0.05


def test_epistemic_score_flags_where_the_regressor_is_biased():
    scores, y = heteroscedastic(3000, 5, bias=0.8)[:2]
    test, _, _, x = heteroscedastic(1000, 6, bias=0.8)
    sds = sdk.create("calibrator", "split_point_uq").fit(scores, y)(test)[:, 4]
    assert float(sds[x > 1.2].mean()) > 10 * float(sds[x < 0.8].mean())
    unbiased = sdk.create("calibrator", "split_point_uq").fit(*heteroscedastic(3000, 5)[:2])
    plain = unbiased(heteroscedastic(1000, 6)[0])[:, 4]
    assert float(plain[x > 1.2].mean()) < float(sds[x > 1.2].mean()) / 10


def test_calibrated_intervals_are_never_narrower():
    scores, y = heteroscedastic(1000, 7, bias=0.8)[:2]
    test = heteroscedastic(300, 8, bias=0.8)[0]
    wide = sdk.create("calibrator", "split_point_uq").fit(scores, y)(test)
    raw = sdk.create("calibrator", "split_point_uq", calibrate_intervals=False).fit(scores, y)(test)
    assert bool((wide[:, 2] - wide[:, 1] >= raw[:, 2] - raw[:, 1] - 1e-12).all())
    assert bool((wide[:, 2] - wide[:, 1] > raw[:, 2] - raw[:, 1] + 1e-6).any())


def test_predictions_only_condition_on_the_prediction():
    scores, y = heteroscedastic(500, 9)[:2]
    cal = sdk.create("calibrator", "split_point_uq").fit(scores[:, :1], y)
    assert cal(scores[:5, :1]).shape == (5, 5)


def test_bad_input_is_refused_by_name():
    scores, y = heteroscedastic(100, 10)[:2]
    cal = sdk.create("calibrator", "split_point_uq")
    with pytest.raises(sdk.ShapeError, match="split_point_uq.*labels must be real regression targets"):
        cal.fit(scores, y.long())
    with pytest.raises(sdk.ShapeError, match="split_point_uq.*NaN"):
        cal.fit(scores, y.clone().fill_(float("nan")))
    with pytest.raises(sdk.NotFittedError, match="split_point_uq"):
        cal(scores)
    cal.fit(scores, y)
    with pytest.raises(sdk.ShapeError, match="split_point_uq.*3 covariate columns"):
        cal(torch.cat([scores, scores], dim=1)[:, :4])
    with pytest.raises(TypeError, match="split_point_uq"):
        cal(sdk.Logits(scores))
    with pytest.raises(sdk.ConfigError, match="coverage"):
        sdk.create("calibrator", "split_point_uq", coverage=1.0)


def test_state_round_trip():
    scores, y = heteroscedastic(200, 11)[:2]
    cal = sdk.create("calibrator", "split_point_uq").fit(scores, y)
    fresh = sdk.create("calibrator", "split_point_uq")
    fresh.load_state_dict(cal.state_dict())
    assert torch.equal(fresh(scores), cal(scores))
