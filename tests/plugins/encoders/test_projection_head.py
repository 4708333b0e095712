"""projection_head: z = g(f(x)); features(x) = f(x)."""

import pytest
import torch
from torch import nn

import sdk


def test_head_on_backbone():
    backbone = sdk.create("encoder", "mlp", in_dim=6, out_dim=5)
    head = sdk.create("encoder", "projection_head", backbone=backbone, hidden_dim=7, out_dim=3)
    head.eval()
    x = torch.randn(4, 6)
    assert torch.allclose(head.features(x), backbone(x))
    assert torch.allclose(head(x), head.head(backbone(x)))
    linears = [m for m in head.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 7), (7, 3)]
    assert head.out_dim == 3


def test_in_dim_must_agree_with_backbone():
    backbone = sdk.create("encoder", "mlp", in_dim=6, out_dim=5)
    with pytest.raises(sdk.ConfigError, match="in_dim=4 disagrees with the backbone's out_dim=5"):
        sdk.create("encoder", "projection_head", backbone=backbone, in_dim=4)
