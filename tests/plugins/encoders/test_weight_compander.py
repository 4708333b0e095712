"""weight_compander: w = scale sign(v) log(1 + mu|v|) / log(1 + mu) on every Linear/Conv weight."""

import copy
import math

import pytest
import torch
from torch import nn

import sdk
from plugins.encoders.weight_compander import compand, expand


def slow_compand(v: float, mu: float, scale: float) -> float:
    s = 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)
    return scale * s * math.log(1 + mu * abs(v)) / math.log(1 + mu)


def test_compand_equals_a_slow_loop_and_is_odd_monotone_and_inverted():
    v = torch.linspace(-3, 3, 61, dtype=torch.float64)
    for mu, scale in ((255.0, 1.0), (5.0, 0.3)):
        w = compand(v, mu, scale)
        expected = torch.tensor([slow_compand(float(t), mu, scale) for t in v], dtype=torch.float64)
        torch.testing.assert_close(w, expected)
        torch.testing.assert_close(compand(-v, mu, scale), -w)
        assert (w.diff() > 0).all()
        torch.testing.assert_close(compand(torch.tensor([1.0, -1.0], dtype=torch.float64), mu, scale),
                                   torch.tensor([scale, -scale], dtype=torch.float64))
        torch.testing.assert_close(expand(w, mu, scale), v)


def test_slope_expands_small_weights_and_compresses_large_ones():
    mu, scale = 255.0, 1.0
    v = torch.tensor([0.0, 0.5, 4.0], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(compand(v, mu, scale).sum(), v)
    analytic = scale * mu / ((1 + mu * v.detach()) * math.log(1 + mu))
    torch.testing.assert_close(slope, analytic)
    assert slope[0] > 40 and slope[2] < 0.1   # 255 / log 256 = 46.0 at 0


def test_defaults_and_initial_function_unchanged():
    enc = sdk.create("encoder", "weight_compander", in_dim=10, hidden_dims=(8,), out_dim=3)
    comp = enc.net[0].parametrizations.weight[0]
    assert float(comp.log_mu.exp()) == pytest.approx(255.0)
    assert float(comp.log_scale.exp()) == pytest.approx(1.0)
    assert not any(p is comp.log_mu for p in enc.parameters())
    backbone = sdk.create("encoder", "mlp", in_dim=6, hidden_dims=(5,), out_dim=4, batch_norm=False)
    plain = copy.deepcopy(backbone)
    wrapped = sdk.create("encoder", "weight_compander", backbone=backbone)
    assert wrapped.out_dim == 4
    x = torch.randn(7, 6)
    torch.testing.assert_close(wrapped(x), plain(x), atol=1e-6, rtol=1e-5)


def test_forward_uses_the_companded_weight_and_its_chain_rule_gradient():
    backbone = sdk.create("encoder", "mlp", in_dim=4, hidden_dims=(), out_dim=3, batch_norm=False)
    enc = sdk.create("encoder", "weight_compander", backbone=backbone, mu=10.0, scale=0.5)
    lin = next(m for m in enc.modules() if isinstance(m, nn.Linear))
    v = lin.parametrizations.weight.original
    with torch.no_grad():
        v.copy_(torch.randn(3, 4))
    x = torch.randn(5, 4)
    w = torch.tensor([[slow_compand(float(t), 10.0, 0.5) for t in row] for row in v.detach()])
    z = enc(x)
    torch.testing.assert_close(z, x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)
    z.sum().backward()
    slope = 0.5 * 10.0 / ((1 + 10.0 * v.detach().abs()) * math.log(11.0))
    torch.testing.assert_close(v.grad, x.sum(0).expand(3, 4) * slope, atol=1e-5, rtol=1e-5)


def test_learned_mu_and_scale_train_and_survive_a_state_round_trip():
    torch.manual_seed(0)
    enc = sdk.create("encoder", "weight_compander", in_dim=5, hidden_dims=(6,), out_dim=2, learn=True)
    comp = enc.net[0].parametrizations.weight[0]
    assert isinstance(comp.log_mu, nn.Parameter) and isinstance(comp.log_scale, nn.Parameter)
    enc(torch.randn(8, 5)).pow(2).sum().backward()
    assert comp.log_mu.grad.abs() > 0 and comp.log_scale.grad.abs() > 0
    with torch.no_grad():
        comp.log_scale.add_(0.3)
    other = sdk.create("encoder", "weight_compander", in_dim=5, hidden_dims=(6,), out_dim=2, learn=True)
    other.load_state_dict(enc.state_dict())
    enc.eval(), other.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(other(x), enc(x))


def test_conv_layers_are_reparameterised_too():
    conv = sdk.encoder(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), out_dim=2 * 4 * 4)
    sdk.create("encoder", "weight_compander", backbone=conv)
    assert torch.nn.utils.parametrize.is_parametrized(conv.module[0], "weight")


def test_errors():
    with pytest.raises(sdk.ConfigError, match="weight_compander: mu must be > 0"):
        sdk.create("encoder", "weight_compander", mu=0.0)
    with pytest.raises(sdk.ConfigError, match="weight_compander: scale must be > 0"):
        sdk.create("encoder", "weight_compander", scale=-1.0)
    backbone = sdk.create("encoder", "mlp", in_dim=4, out_dim=3)
    sdk.create("encoder", "weight_compander", backbone=backbone)
    with pytest.raises(sdk.ConfigError, match="already parametrised"):
        sdk.create("encoder", "weight_compander", backbone=backbone)
    with pytest.raises(sdk.ConfigError, match="no Linear or Conv layer"):
        sdk.create("encoder", "weight_compander", backbone=sdk.encoder(nn.Flatten(), out_dim=4))
    enc = sdk.create("encoder", "weight_compander", in_dim=8)
    with pytest.raises(sdk.ShapeError, match=r"encoder 'weight_compander': x \(flattened\) must be "
                                             r"floating \[B, 8\]"):
        enc(torch.zeros(2, 9))
