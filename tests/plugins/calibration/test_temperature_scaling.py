"""temperature_scaling finds the NLL-optimal temperature and reduces ECE on real data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import sdk


def ece(probs, labels, n_bins=15):
    conf, pred = probs.max(1)
    total = 0.0
    for lo in np.linspace(0, 1, n_bins + 1)[:-1]:
        m = (conf > lo) & (conf <= lo + 1 / n_bins)
        if m.any():
            total += m.float().mean() * abs((pred[m] == labels[m]).float().mean() - conf[m].mean())
    return float(total)


def test_fitted_temperature_is_nll_argmin():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    logits = 4 * F.one_hot(labels, 4) + 2.5 * torch.randn(200, 4, generator=g)
    cal = sdk.create("calibrator", "temperature_scaling").fit(logits, labels)
    grid = torch.linspace(0.2, 5, 2000)
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    assert cal.temperature == pytest.approx(float(grid[nll.argmin()]), abs=5e-3)
    assert torch.equal(cal.predict(logits), logits.argmax(1))  # argmax is preserved


def test_reduces_ece_of_overconfident_model_on_digits():
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16, y, test_size=0.5, random_state=0)
    x_cal, x_ev, y_cal, y_ev = train_test_split(x_te, y_te, test_size=0.5, random_state=0)
    clf = LogisticRegression(C=1e4, max_iter=2000).fit(x_tr, y_tr)  # barely regularised: overconfident
    logit = lambda a: torch.tensor(clf.decision_function(a), dtype=torch.float32)  # noqa: E731
    cal = sdk.create("calibrator", "temperature_scaling").fit(logit(x_cal), torch.tensor(y_cal))
    before = ece(logit(x_ev).softmax(1), torch.tensor(y_ev))
    after = ece(cal.predict_proba(logit(x_ev)), torch.tensor(y_ev))
    assert cal.temperature > 1.0
    assert after < 0.6 * before


def test_bad_shapes():
    cal = sdk.create("calibrator", "temperature_scaling")
    with pytest.raises(sdk.ShapeError, match=r"labels must be integer class ids \[5\], got torch.int64 \[4\]"):
        cal.fit(torch.zeros(5, 3), torch.zeros(4, dtype=torch.long))


def test_nan_and_one_class_are_refused_before_the_fit():
    cal = sdk.create("calibrator", "temperature_scaling")
    z = torch.randn(6, 3)
    with pytest.raises(sdk.ShapeError, match="'temperature_scaling': labels hold one class only"):
        cal.fit(z, torch.full((6,), 2))
    z[1, 1] = float("-inf")
    with pytest.raises(sdk.ShapeError, match="'temperature_scaling': fit's scores hold NaN or inf"):
        cal.fit(z, torch.arange(6) % 3)
