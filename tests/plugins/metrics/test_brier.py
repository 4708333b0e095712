"""brier against scikit-learn (multiclass and per class) and analytic values."""

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss

import sdk
from plugins.metrics.brier import brier


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(300, 6, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.randint(0, 6, (300,), generator=g)
    p, y = probs.numpy(), labels.numpy()
    per_class = sum(brier_score_loss(y == c, p[:, c]) for c in range(6))
    multiclass = brier_score_loss(y, p, labels=np.arange(6), scale_by_half=False)
    assert brier(probs, labels) == pytest.approx(per_class, rel=1e-12)
    assert brier(probs, labels) == pytest.approx(multiclass, rel=1e-12)
    metric = sdk.create("metric", "brier")
    metric.update(probs, labels)
    assert metric.compute() == pytest.approx(per_class, rel=1e-12)


def test_analytic_values():
    labels = torch.tensor([0, 1, 2, 3])
    onehot = torch.eye(4)
    assert brier(onehot, labels) == 0.0                    # certain and right
    assert brier(onehot.roll(1, dims=1), labels) == 2.0    # certain and wrong
    assert brier(torch.full((4, 4), 0.25), labels) == pytest.approx(1 - 1 / 4)  # uniform: 1 - 1/C
