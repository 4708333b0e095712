"""mlp encoder: layer structure, flattening and clear shape errors."""

import pytest
import torch
from torch import nn

import sdk


def test_structure_and_flattening():
    enc = sdk.create("encoder", "mlp", in_dim=12, hidden_dims=(7, 5), out_dim=3)
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 7), (7, 5), (5, 3)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in enc.modules()) == 2
    x = torch.randn(4, 3, 4)
    enc.eval()
    assert torch.allclose(enc(x), enc(x.reshape(4, 12)))


def test_without_batch_norm_is_plain_composition():
    enc = sdk.create("encoder", "mlp", in_dim=3, hidden_dims=(4,), out_dim=2, batch_norm=False)
    l1, l2 = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(5, 3)
    assert torch.allclose(enc(x), l2(torch.relu(l1(x))))


def test_errors():
    enc = sdk.create("encoder", "mlp", in_dim=8)
    with pytest.raises(sdk.ShapeError, match=r"x \(flattened\) must be floating \[B, 8\], got torch.float32 \[2, 9\]"):
        enc(torch.zeros(2, 9))
    with pytest.raises(sdk.ConfigError, match="activation must be one of"):
        sdk.create("encoder", "mlp", activation="swish")
