"""bbq against a slow transcription of Naeini et al.'s model average (numpy quantiles,
math.lgamma, loops), the number of models, and its effect on held-out data."""

import math

import numpy as np
import pytest
import torch

import sdk
from plugins.calibration.bbq import bin_range


def slow_bbq(s_fit, y_fit, s, prior=2.0):
    n = len(s_fit)
    models = []
    root = n ** (1 / 3)
    for b in range(max(1, math.floor(root / 10)), min(math.ceil(n / 5), math.ceil(10 * root)) + 1):
        inner = np.quantile(s_fit, [k / b for k in range(1, b)])
        edges = [0.0, *inner, 1.0]

        def bin_of(v, inner=inner, b=b):
            return next((k for k, e in enumerate(inner) if v <= e), b - 1)

        log_ml, theta = 0.0, []
        for k in range(b):
            members = [i for i in range(n) if bin_of(s_fit[i]) == k]
            nb, mb = len(members), sum(int(y_fit[i]) for i in members)
            pk = min(max((edges[k] + edges[k + 1]) / 2, 1e-6), 1 - 1e-6)
            a, bb = prior / b * pk, prior / b * (1 - pk)
            log_ml += (math.lgamma(prior / b) - math.lgamma(nb + prior / b) + math.lgamma(mb + a)
                       - math.lgamma(a) + math.lgamma(nb - mb + bb) - math.lgamma(bb))
            theta.append((mb + a) / (nb + prior / b))
        models.append((log_ml, theta, bin_of))
    top = max(m[0] for m in models)
    w = [math.exp(m[0] - top) for m in models]
    return [sum(wi * th[f(v)] for wi, (_, th, f) in zip(w, models)) / sum(w) for v in s]


def test_binary_matches_slow_model_average():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (150,), generator=g)
    s = (2 * torch.randn(150, generator=g, dtype=torch.float64) + 1.5 * (2 * y - 1)).sigmoid()
    q = torch.rand(30, generator=g, dtype=torch.float64)
    cal = sdk.create("calibrator", "bbq").fit(torch.stack([1 - s, s], 1), y)
    out = cal(torch.stack([1 - q, q], 1))
    assert np.allclose(out[:, 1].numpy(), slow_bbq(s.numpy(), y.numpy(), q.numpy()), atol=1e-10)
    assert cal.theta.shape[0] == len(bin_range(150)) == 30  # B = 1 .. min(ceil(150 / 5), ceil(10 * 150^(1/3)))


@pytest.mark.parametrize("dataset", ["digits", "breast_cancer"])
def test_improves_naive_bayes_on_held_out_data(held_out, metrics, dataset):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out(dataset, "nb")
    base = z_te.softmax(1)
    p = sdk.create("calibrator", "bbq").fit(z_cal.softmax(1), y_cal)(base)
    assert ece(p, y_te) < 0.6 * ece(base, y_te) and nll(p, y_te) < 0.3 * nll(base, y_te)


def test_errors():
    cal = sdk.create("calibrator", "bbq")
    with pytest.raises(sdk.NotFittedError, match="'bbq'"):
        cal(torch.full((3, 2), 0.5))
    with pytest.raises(sdk.ShapeError, match="'bbq': labels hold one class only"):
        cal.fit(torch.full((3, 2), 0.5), torch.ones(3, dtype=torch.long))
    with pytest.raises(sdk.ConfigError, match="prior_strength"):
        sdk.create("calibrator", "bbq", prior_strength=0.0)
