"""conformal_prediction: the coverage guarantee over many random calibration/test splits of
held-out digits (1 - alpha <= mean coverage <= 1 - alpha + 1/(n + 1), to sampling error), the
scores against a per-class loop, the quantile rule, and set sizes of THR / APS / RAPS."""

import math

import pytest
import torch

import sdk
from plugins.calibration.conformal_prediction import conformity_scores

N_CAL, SPLITS, ALPHA = 500, 100, 0.1


def split_runs(pool, score, alpha=ALPHA, **params):
    """Mean coverage, its standard error and the mean set size over SPLITS random splits."""
    p, y = pool
    cal = sdk.create("calibrator", "conformal_prediction", score=score, **params)
    cover, size = [], []
    for r in range(SPLITS):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(r))
        c, t = perm[:N_CAL], perm[N_CAL:]
        sets = cal.fit(p[c], y[c]).predict(p[t], alpha=alpha)
        cover.append(float(sets[torch.arange(len(t)), y[t]].double().mean()))
        size.append(float(sets.sum(1).double().mean()))
    cover = torch.tensor(cover, dtype=torch.float64)
    return float(cover.mean()), float(cover.std() / math.sqrt(SPLITS)), sum(size) / SPLITS


@pytest.fixture
def pool(held_out):
    z_cal, y_cal, z_te, y_te = held_out("digits", "logistic")
    return torch.cat([z_cal, z_te]).softmax(1), torch.cat([y_cal, y_te])


@pytest.mark.parametrize("score", ["thr", "aps", "raps"])
def test_coverage_guarantee_over_random_splits(pool, score):
    mean, se, _ = split_runs(pool, score)
    assert 1 - ALPHA - 3 * se <= mean <= 1 - ALPHA + 1 / (N_CAL + 1) + 3 * se
    assert se < 0.003  # the check is tight: 100 splits of 500 calibration rows


def test_set_sizes_thr_smallest_raps_below_aps_on_a_flat_classifier(pool):
    p, y = pool
    flat = (p.log() / 4).softmax(1)  # temperature 4: probabilities spread over the tail
    thr, aps, raps = (split_runs((flat, y), s, k_reg=1, lam=0.1)[2] for s in ("thr", "aps", "raps"))
    # THR minimises the mean set size for given probabilities (Sadinle et al. 2019);
    # RAPS' rank penalty trims the noisy tail APS includes (Angelopoulos et al. 2021)
    assert thr < raps < aps and aps > 1.05 * raps


def slow_scores(p, u, score, k_reg, lam):
    out = torch.zeros(p.shape, dtype=torch.float64)
    for i in range(p.shape[0]):
        ranked = sorted(range(p.shape[1]), key=lambda j: (-float(p[i, j]), j))
        for j in range(p.shape[1]):
            o = ranked.index(j) + 1
            if score == "thr":
                out[i, j] = 1 - p[i, j]
                continue
            out[i, j] = sum(float(p[i, k]) for k in ranked[:o - 1]) + float(u[i]) * float(p[i, j])
            if score == "raps":
                out[i, j] += lam * max(0, o - k_reg)
    return out


@pytest.mark.parametrize("score", ["thr", "aps", "raps"])
def test_scores_match_a_loop(score):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(12, 6, generator=g, dtype=torch.float64).softmax(1)
    u = torch.rand(12, generator=g, dtype=torch.float64)
    e = conformity_scores(p, score, u, k_reg=2, lam=0.3)
    assert torch.allclose(e, slow_scores(p, u, score, 2, 0.3), atol=1e-12)


def test_threshold_is_the_finite_sample_quantile_and_sets_nest():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (19,), generator=g)
    p = (torch.nn.functional.one_hot(y, 5) + torch.randn(19, 5, generator=g, dtype=torch.float64)).softmax(1)
    cal = sdk.create("calibrator", "conformal_prediction", score="thr").fit(p, y)
    e = (1 - p[torch.arange(19), y]).sort().values
    assert float(cal.threshold(0.1)) == float(e[math.ceil(20 * 0.9) - 1])  # the 18th of 19
    assert math.isinf(float(cal.threshold(0.04)))  # ceil(20 * 0.96) = 20 > 19: every class
    assert cal.predict(p, alpha=0.04).all()
    small, big = cal.predict(p, alpha=0.5), cal.predict(p, alpha=0.1)
    assert (big | ~small).all() and big.sum() > small.sum()
    assert torch.equal(cal(p), p) and cal.predict(p).dtype == torch.bool  # alpha 0.1 by default
    assert torch.equal(cal.predict(p), big)


def test_deterministic_and_errors():
    p = torch.full((6, 3), 1 / 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = sdk.create("calibrator", "conformal_prediction", score="aps").fit(p, y)
    b = sdk.create("calibrator", "conformal_prediction", score="aps").fit(p, y)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.predict(p), b.predict(p))
    with pytest.raises(sdk.ConfigError, match="'conformal_prediction': alpha must lie in"):
        a.predict(p, alpha=1.5)
    with pytest.raises(sdk.NotFittedError, match="conformal_prediction"):
        sdk.create("calibrator", "conformal_prediction").predict(p)
    with pytest.raises(sdk.ConfigError, match="score"):
        sdk.create("calibrator", "conformal_prediction", score="lac")
