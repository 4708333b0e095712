"""classwise_ece against an explicit per-class bin loop and analytic cases."""

import pytest
import torch

import sdk
from plugins.metrics.classwise_ece import classwise_ece
from plugins.metrics.ece import ece


def slow_classwise_ece(probs, labels, n_bins=15):
    n, c = probs.shape
    total = 0.0
    for k in range(c):
        p = probs[:, k].tolist()
        y = [float(int(labels[i]) == k) for i in range(n)]
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            members = [i for i in range(n) if (lo < p[i] or b == 0) and p[i] <= hi]
            if members:
                gap = abs(sum(y[i] for i in members) - sum(p[i] for i in members)) / len(members)
                total += len(members) / n * gap
    return total / c


@pytest.mark.parametrize("n_bins", [3, 15])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop(seed, n_bins):
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(200, 5, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.randint(0, 5, (200,), generator=g)
    assert classwise_ece(probs, labels, n_bins) == pytest.approx(slow_classwise_ece(probs, labels, n_bins), abs=1e-12)
    metric = sdk.create("metric", "classwise_ece", n_bins=n_bins)
    metric.update(probs.float(), labels)
    assert metric.compute() == pytest.approx(slow_classwise_ece(probs.float(), labels, n_bins), abs=1e-6)


def test_calibrated_vector_is_zero():
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert classwise_ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_sees_miscalibration_the_top_label_misses():
    # top label (class 0, p = 0.6) is right 6 times in 10: ECE = 0; but class 1 never occurs
    # (p = 0.3, gap 0.3) and class 2 occurs 4 times (p = 0.1, gap 0.3)
    probs = torch.tensor([[0.6, 0.3, 0.1]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 6 + [2] * 4)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert classwise_ece(probs, labels) == pytest.approx((0 + 0.3 + 0.3) / 3, abs=1e-12)


def test_zero_probabilities_join_the_first_bin():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])  # class 1: p = 0 twice, frequency 1/2
    assert classwise_ece(probs, labels, n_bins=4) == pytest.approx((0.5 + 0.5) / 2)
