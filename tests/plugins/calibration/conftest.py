"""Held-out scores of real classifiers (scikit-learn data sets) and slow reference metrics for
the calibrator tests; train, calibration and test splits are disjoint."""

import functools

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

_LOADERS = {"digits": load_digits, "wine": load_wine, "breast_cancer": load_breast_cancer}


@functools.cache
def _scores(dataset: str, model: str):
    x, y = _LOADERS[dataset](return_X_y=True)
    x = StandardScaler().fit_transform(x)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.6, random_state=0, stratify=y)
    x_cal, x_te, y_cal, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0,
                                                stratify=y_rest)
    if model == "mlp":  # over-trained, unregularised: over-confident on held-out data
        clf = MLPClassifier((32,), alpha=0.0, max_iter=2000, random_state=0).fit(x_tr, y_tr)
        logit = lambda a: np.log(np.clip(clf.predict_proba(a), 1e-12, 1))  # noqa: E731
    elif model == "logistic":  # barely regularised logistic regression: over-confident
        clf = LogisticRegression(C=1e4, max_iter=5000).fit(x_tr, y_tr)
        logit = lambda a: np.log(np.clip(clf.predict_proba(a), 1e-12, 1))  # noqa: E731
    else:  # Gaussian naive Bayes: badly calibrated (its independence assumption)
        clf = GaussianNB().fit(x_tr, y_tr)
        logit = lambda a: np.clip(clf.predict_log_proba(a), -50, 0)  # noqa: E731
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return (t(logit(x_cal)), torch.tensor(y_cal), t(logit(x_te)), torch.tensor(y_te))


@pytest.fixture
def held_out():
    """``held_out(dataset, model) -> (z_cal, y_cal, z_test, y_test)``: log-probabilities of a
    model trained on 40% of the data, on two disjoint 30% splits."""
    return _scores


def slow_ece(probs, labels, n_bins=15):
    """Top-label ECE, bin by bin (right-closed bins, 0 in the first)."""
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = ((conf > lo) | (b == 0)) & (conf <= hi)
        if m.any():
            total += float(m.double().mean()) * abs(float((pred[m] == labels[m]).double().mean())
                                                   - float(conf[m].double().mean()))
    return total


def slow_nll(probs, labels):
    return float(-np.mean([np.log(max(float(probs[i, y]), 1e-12)) for i, y in enumerate(labels.tolist())]))


@pytest.fixture
def metrics():
    return slow_ece, slow_nll
