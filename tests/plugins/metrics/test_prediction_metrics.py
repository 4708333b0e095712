"""accuracy and nll against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss

import sdk
from plugins.metrics.prediction_metrics import accuracy, nll


def data(seed, n=257, c=7):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return logits, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_matches_sklearn_on_logits_and_probs(seed):
    logits, labels = data(seed)
    expected = accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert accuracy(logits, labels) == pytest.approx(expected, abs=1e-12)
    assert accuracy(logits.softmax(1), labels) == pytest.approx(expected, abs=1e-12)
    assert accuracy(logits, (logits.argmax(1) + 1) % 7) == 0.0
    metric = sdk.create("metric", "accuracy")
    metric.update(logits.float(), labels)
    assert metric.compute() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_matches_sklearn_log_loss(seed):
    logits, labels = data(seed)
    probs = logits.softmax(1)
    expected = log_loss(labels.numpy(), probs.numpy(), labels=np.arange(7))
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-12)
    metric = sdk.create("metric", "nll")
    metric.update(probs, labels)
    assert metric.compute() == pytest.approx(expected, rel=1e-12)


def test_nll_clips_a_zero_probability_like_sklearn():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    expected = log_loss(labels.numpy(), probs.numpy(), labels=np.arange(3))
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-9)
    assert nll(probs, labels) == pytest.approx((-np.log(np.finfo(np.float64).eps) - np.log(0.5)) / 2)
