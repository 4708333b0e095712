"""loki_frechet_mean: the Fréchet mean by a slow loop, the argmax under the 0/1 metric, the
unseen middle label of a path (analytic), and on held-out digits with one class never trained
on, a lower expected squared distance than the argmax and correct predictions of that class."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import sdk


def slow_frechet(probs, d, observed):
    out = []
    for p in probs.tolist():
        costs = [sum(pk * float(d[y, lam]) ** 2 for pk, lam in zip(p, observed)) for y in range(d.shape[0])]
        out.append(int(np.argmin(costs)))
    return torch.tensor(out)


def test_matches_a_slow_loop_on_a_random_metric():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(9, 2, generator=g, dtype=torch.float64)
    d = torch.cdist(pts, pts)  # a Euclidean metric on 9 labels
    observed = [0, 3, 5, 8]
    probs = torch.rand(200, 4, generator=g, dtype=torch.float64).pow(3)
    probs = probs / probs.sum(1, keepdim=True)
    cal = sdk.create("calibrator", "loki_frechet_mean", distances=d.tolist(), observed=observed)
    pred = cal.fit(probs, torch.arange(200) % 4).predict(probs)
    assert torch.equal(pred, slow_frechet(probs, d, observed))
    assert set(pred.tolist()) - set(observed)  # labels the model never had are predicted
    assert torch.equal(cal(probs), probs)


def test_the_zero_one_metric_is_the_argmax():
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(100, 6, generator=g).softmax(1)
    cal = sdk.create("calibrator", "loki_frechet_mean").fit(probs, torch.arange(100) % 6)
    assert torch.equal(cal.predict(probs), probs.argmax(1))


def test_an_unseen_middle_label_takes_a_split_mass():
    # the path 0 - 1 - 2, the model knows 0 and 2: half and half -> the middle (cost 1 vs 2)
    d = [[0, 1, 2], [1, 0, 1], [2, 1, 0]]
    cal = sdk.create("calibrator", "loki_frechet_mean", distances=d, observed=[0, 2])
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], dtype=torch.float64)
    # costs 4 p_2 (label 0), 1 (label 1), 4 p_0 (label 2): the middle while both p > 1/4
    assert cal.fit(probs, torch.tensor([0, 1, 0, 1])).predict(probs).tolist() == [1, 0, 2, 1]
    everyone = sdk.create("calibrator", "loki_frechet_mean", distances=d)  # observed: 0, 1, 2
    sure = torch.tensor([[0.0, 0.1, 0.9], [0.8, 0.2, 0.0], [0.2, 0.6, 0.2]], dtype=torch.float64)
    assert everyone.fit(sure, torch.tensor([2, 0, 1])).predict(sure).tolist() == [2, 0, 1]


def test_predicts_an_unseen_digit_on_held_out_data():
    x, y = load_digits(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    unseen = 8
    seen = [c for c in range(10) if c != unseen]
    keep = y_tr != unseen
    clf = LogisticRegression(C=0.05, max_iter=2000).fit(x_tr[keep], y_tr[keep])
    means = torch.tensor(np.stack([x_tr[y_tr == c].mean(0) for c in range(10)]))
    d = torch.cdist(means, means)  # an external metric: distances of the class means
    probs = torch.tensor(clf.predict_proba(x_te))
    cal = sdk.create("calibrator", "loki_frechet_mean", distances=d.tolist(), observed=seen)
    known = y_te != unseen
    loki = cal.fit(probs[known], torch.tensor(np.searchsorted(seen, y_te[known]))).predict(probs)
    argmax = torch.tensor(seen)[probs.argmax(1)]
    truth = torch.tensor(y_te)
    sq = d.pow(2)
    assert sq[loki, truth].mean() < 0.95 * sq[argmax, truth].mean()  # the paper's expected d^2
    hit = (loki[truth == unseen] == unseen).double().mean()
    false_alarm = (loki[truth != unseen] == unseen).double().mean()
    assert hit > 0.15 and false_alarm < 0.05  # the argmax can never predict it
    assert (loki == truth).double().mean() > (argmax == truth).double().mean()  # 0.887 vs 0.867


def test_bad_metrics_and_widths_are_refused():
    with pytest.raises(sdk.ConfigError, match="'loki_frechet_mean': distances must be a square"):
        sdk.create("calibrator", "loki_frechet_mean", distances=[[0, 1]])
    with pytest.raises(sdk.ConfigError, match="zero diagonal, symmetric"):
        sdk.create("calibrator", "loki_frechet_mean", distances=[[0, 1], [2, 0]])
    with pytest.raises(sdk.ConfigError, match="observed ids must lie in"):
        sdk.create("calibrator", "loki_frechet_mean", distances=[[0, 1], [1, 0]], observed=[0, 2])
    cal = sdk.create("calibrator", "loki_frechet_mean", distances=[[0, 1], [1, 0]], observed=[1, 0])
    probs = torch.rand(6, 3).softmax(1)
    with pytest.raises(sdk.ShapeError, match="'loki_frechet_mean': the probabilities have 3 classes"):
        cal.fit(probs, torch.arange(6) % 3)
    with pytest.raises(sdk.NotFittedError):
        cal.predict(probs[:, :2])
