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


def test_last_norm_standardises_the_output_as_simsiams_projector():
    head = sdk.create("encoder", "projection_head", in_dim=6, hidden_dim=16, out_dim=5, layers=3,
                      last_norm=True)
    assert isinstance(head.head[-1], torch.nn.BatchNorm1d) and not head.head[-1].affine
    z = head(torch.randn(32, 6, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(z.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    plain = sdk.create("encoder", "projection_head", in_dim=6, hidden_dim=16, out_dim=5, layers=3)
    assert isinstance(plain.head[-1], torch.nn.Linear)
