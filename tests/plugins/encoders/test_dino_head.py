"""dino_head against an explicit computation of its layers, and its weight normalisation."""

import math

import pytest
import torch
from torch import nn

import sdk


def _head(**kw):
    torch.manual_seed(0)
    return sdk.create("encoder", "dino_head", **{"in_dim": 6, "hidden_dim": 12, "bottleneck_dim": 4,
                                                 "out_dim": 9, **kw})


def test_published_structure_and_defaults():
    head = sdk.create("encoder", "dino_head", in_dim=8)
    linears = [m for m in head.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 2048), (2048, 2048), (2048, 256)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert sum(isinstance(m, nn.GELU) for m in head.modules()) == 2
    assert head.head[-1].v.shape == (head.out_dim, 256) and head.head[-1].g is None
    assert float(linears[0].weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert all(not m.bias.detach().any() for m in linears)


def test_output_is_the_cosine_of_the_bottleneck_with_each_prototype():
    head = _head().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    lin = [m for m in head.head.modules() if isinstance(m, nn.Linear)]
    u = lin[2](nn.functional.gelu(lin[1](nn.functional.gelu(lin[0](x)))))
    v = head.head[-1].v
    for i in range(5):
        for k in range(9):
            cos = float(u[i] @ v[k]) / math.sqrt(float(u[i] @ u[i]) * float(v[k] @ v[k]))
            assert float(head(x)[i, k]) == pytest.approx(cos, rel=1e-9)
    # rescaling a prototype's direction changes nothing (its norm is fixed at 1)
    before = head(x)
    with torch.no_grad():
        head.head[-1].v[3] *= 7.0
    torch.testing.assert_close(head(x), before)


def test_without_norm_last_layer_the_row_norms_are_learned():
    head = _head(norm_last_layer=False)
    g = head.head[-1].g
    assert g is not None and torch.equal(g, torch.ones(9, 1))
    x = torch.randn(4, 6)
    out = head(x)
    with torch.no_grad():
        g[2] = 3.0
    torch.testing.assert_close(head(x)[:, 2], 3 * out[:, 2].detach())
    head(x).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    assert _head().head[-1].g is None  # fixed: nothing for the optimizer to change


def test_on_a_backbone_and_copied_by_the_ema_teacher():
    backbone = sdk.create("encoder", "mlp", in_dim=6, out_dim=5)
    head = sdk.create("encoder", "dino_head", backbone=backbone, hidden_dim=8, bottleneck_dim=4,
                      out_dim=7).eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(head.features(x), backbone(x))
    teacher = sdk.create("teacher", "ema").attach(head)
    torch.testing.assert_close(teacher(x), head(x))
    with pytest.raises(sdk.ConfigError, match="in_dim=4 disagrees"):
        sdk.create("encoder", "dino_head", backbone=backbone, in_dim=4)
    with pytest.raises(sdk.ShapeError, match="dino_head.*x must be floating \\[B, 6\\]"):
        _head()(torch.randn(3, 5))
