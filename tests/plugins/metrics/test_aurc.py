"""aurc against the exact risk-coverage area (distinct confidences) within its bound, the
analytic values of tied and perfectly ranked rows, streaming."""

import numpy as np
import pytest
import torch

import sdk
from plugins.metrics.aurc import aurc


def exact_aurc(probs, labels):
    conf, pred = probs.max(1).values.numpy(), probs.argmax(1).numpy()
    err = (pred != labels.numpy())[np.argsort(-conf, kind="stable")]
    return float(np.mean(np.cumsum(err) / np.arange(1, len(err) + 1)))


@pytest.mark.parametrize("seed, n", [(0, 3000), (1, 40)])
def test_within_its_bound_of_the_exact_area(seed, n):
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(n, 4, generator=g, dtype=torch.float64)).softmax(1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    m = sdk.create("metric", "aurc")
    for start in range(0, n, 500):
        m.update(probs[start:start + 500], labels[start:start + 500])
    exact = exact_aurc(probs, labels)
    assert abs(m.compute() - exact) <= m.error_bound() + 1e-12
    assert m.error_bound() < 2e-3
    assert m.compute() == pytest.approx(aurc(probs, labels), abs=1e-12)
    coarse = sdk.create("metric", "aurc", fine_bins=10)
    coarse.update(probs, labels)
    assert abs(coarse.compute() - exact) <= coarse.error_bound() + 1e-12


def test_analytic_values():
    # every row tied: in random order risk(k) has expectation e / N for every k
    probs = torch.full((10, 2), 0.5, dtype=torch.float64)
    probs[:, 0] += 1e-9
    labels = torch.tensor([0] * 7 + [1] * 3)
    assert aurc(probs, labels) == pytest.approx(0.3, abs=1e-12)
    # perfect ranking: the 2 errors are the least confident of 4 -> (0 + 0 + 1/3 + 2/4) / 4
    probs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    assert aurc(probs, labels) == pytest.approx((1 / 3 + 2 / 4) / 4, abs=1e-12)
    assert aurc(probs[:1], labels[:1]) == 0.0 and aurc(probs[2:3], labels[2:3]) == 1.0  # one row
    assert np.isnan(sdk.create("metric", "aurc").compute())
