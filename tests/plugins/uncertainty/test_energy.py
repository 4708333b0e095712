"""energy against a slow log-sum-exp (float64) at T = 1 and another temperature."""

import math

import pytest
import torch

import sdk


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_equals_minus_t_log_sum_exp(temperature):
    z = 4 * torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    slow = [-temperature * math.log(sum(math.exp(v / temperature) for v in row)) for row in z.double().tolist()]
    det = sdk.create("detector", "energy", temperature=temperature)
    assert torch.allclose(det.score(z).double(), torch.tensor(slow, dtype=torch.float64), atol=1e-5)


def test_the_paper_default_temperature_is_one():
    assert sdk.create("detector", "energy").temperature == 1.0
    with pytest.raises(sdk.ConfigError, match="temperature"):
        sdk.create("detector", "energy", temperature=0.0)
