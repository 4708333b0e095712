"""set_coverage and set_size: analytic values, streaming, conformal sets' coverage, errors."""

import pytest
import torch

import sdk
from plugins.metrics.prediction_sets import set_coverage, set_size


def test_analytic_and_streaming():
    sets = torch.tensor([[True, False, True], [False, False, False], [True, True, True], [False, True, False]])
    labels = torch.tensor([2, 0, 1, 0])
    assert set_coverage(sets, labels) == 0.5 and set_size(sets, labels) == 6 / 4
    cov, size = sdk.create("metric", "set_coverage"), sdk.create("metric", "set_size")
    for rows in (slice(0, 1), slice(1, 4)):
        cov.update(sets[rows], labels[rows])
        size.update(sets[rows], labels[rows])
    assert cov.compute() == 0.5 and size.compute() == 1.5


def test_measures_conformal_sets():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (2000,), generator=g)
    p = (2 * torch.nn.functional.one_hot(y, 4) + torch.randn(2000, 4, generator=g)).softmax(1)
    cal = sdk.create("calibrator", "conformal_prediction", score="thr").fit(p[:1000], y[:1000])
    sets = cal.predict(p[1000:], alpha=0.2)
    assert set_coverage(sets, y[1000:]) == pytest.approx(0.8, abs=0.03)
    assert 0.5 < set_size(sets, y[1000:]) < 4


def test_errors_name_the_metric():
    with pytest.raises(sdk.ShapeError, match=r"set_size: sets must hold only 0 and 1 \(a membership mask\), got 0.5"):
        set_size(torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(sdk.ShapeError, match=r"set_size: sets must be a membership mask \[N, C\]"):
        set_size(torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    assert set_size(torch.ones(3, 2), torch.zeros(3, dtype=torch.long)) == 2.0  # 0/1 numbers are a mask
    with pytest.raises(sdk.ShapeError, match=r"set_coverage: labels must lie in \[0, 2\)"):
        set_coverage(torch.ones(3, 2, dtype=torch.bool), torch.tensor([0, 1, 2]))
