"""The OOD metrics against scikit-learn on the same scores, with many ties, one-shot and
streamed in uneven batches."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import sdk
from sdk.metrics import aupr_in, aupr_out, auroc, fpr_at_tpr


def scores_and_flags(n=500, seed=0, decimals=1):
    g = torch.Generator().manual_seed(seed)
    is_ood = (torch.rand(n, generator=g) < 0.3).long()
    scores = torch.randn(n, generator=g) + 0.8 * is_ood
    return torch.round(scores, decimals=decimals), is_ood  # rounding makes ties


def sk_fpr(scores, is_ood, tpr):
    fpr, tpr_curve, _ = roc_curve(1 - is_ood, -scores, drop_intermediate=False)
    return fpr[np.searchsorted(tpr_curve, tpr, side="left")]


@pytest.mark.parametrize("decimals", [0, 1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_scikit_learn_with_ties(seed, decimals):
    s, y = scores_and_flags(seed=seed, decimals=decimals)
    sn, yn = s.double().numpy(), y.numpy()
    assert auroc(s, y) == pytest.approx(roc_auc_score(yn, sn), abs=1e-12)
    assert aupr_out(s, y) == pytest.approx(average_precision_score(yn, sn), abs=1e-12)
    assert aupr_in(s, y) == pytest.approx(average_precision_score(1 - yn, -sn), abs=1e-12)
    for tpr in (0.95, 0.5, 1.0):
        assert fpr_at_tpr(s, y, tpr) == pytest.approx(sk_fpr(sn, yn, tpr), abs=1e-12)


@pytest.mark.parametrize(("name", "oracle"), [
    ("auroc", lambda s, y: roc_auc_score(y, s)),
    ("aupr_in", lambda s, y: average_precision_score(1 - y, -s)),
    ("aupr_out", lambda s, y: average_precision_score(y, s)),
    ("fpr_at_tpr", lambda s, y: sk_fpr(s, y, 0.95)),
])
def test_streamed_metric_plugins_equal_scikit_learn(name, oracle):
    s, y = scores_and_flags(seed=3)
    metric = sdk.create("metric", name)
    for lo, hi in [(0, 1), (1, 77), (77, 500)]:
        metric.update(s[lo:hi], y[lo:hi])
    assert metric.compute() == pytest.approx(oracle(s.double().numpy(), y.numpy()), abs=1e-12)
    fresh = sdk.create("metric", name)
    fresh.load_state_dict(metric.state_dict())
    assert fresh.compute() == metric.compute()


def test_analytic_values_and_undefined_cases():
    y = torch.tensor([0, 0, 0, 1, 1])
    separated = torch.tensor([0.1, 0.2, 0.3, 0.9, 1.0])
    assert auroc(separated, y) == 1.0 and fpr_at_tpr(separated, y) == 0.0
    assert auroc(-separated, y) == 0.0 and fpr_at_tpr(-separated, y) == 1.0
    assert auroc(torch.zeros(5), y) == 0.5  # all tied
    assert aupr_out(torch.zeros(5), y) == pytest.approx(0.4)  # the positive rate
    assert math.isnan(auroc(torch.tensor([1.0, math.nan, 0.0, 0.0, 1.0]), y))
    assert math.isnan(auroc(separated, torch.zeros(5, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match="is_ood must hold 0 .* or 1"):
        auroc(separated, y + 1)
    with pytest.raises(sdk.ConfigError, match="tpr"):
        sdk.create("metric", "fpr_at_tpr", tpr=0.0)
