"""msp against a slow per-row softmax (float64)."""

import math

import torch

import sdk
from plugins.uncertainty.msp import msp_score


def test_msp_equals_the_negated_max_softmax_row_by_row():
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(0)) * 3
    slow = [-max(math.exp(v) for v in row) / sum(math.exp(v) for v in row) for row in z.double().tolist()]
    det = sdk.create("detector", "msp")
    assert torch.allclose(det.score(z).double(), torch.tensor(slow, dtype=torch.float64), atol=1e-6)
    assert torch.equal(det.score(sdk.Logits(z)), msp_score(z))


def test_a_peaked_row_is_less_anomalous_than_a_flat_one():
    det = sdk.create("detector", "msp")
    s = det.score(torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert s[0] < s[1] and torch.isclose(s[1], torch.tensor(-1 / 3))
