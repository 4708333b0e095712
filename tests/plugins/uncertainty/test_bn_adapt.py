"""bn_adapt against a hand-written forward (float64) that normalises with Schneider et al.'s
mixed statistics, and its prior = 0 case against BatchNorm in training mode."""

import copy

import pytest
import torch
from torch import nn

import sdk


def bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def slow_forward(model, x, prior):
    lin, bn, _, out = model
    h = lin(x).detach()
    n = x.shape[0]
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    w = prior / (prior + n)
    mu = w * bn.running_mean + (1 - w) * mean
    sigma2 = w * bn.running_var + (1 - w) * var
    return out(torch.relu((h - mu) / torch.sqrt(sigma2 + bn.eps) * bn.weight + bn.bias)).detach()


@pytest.mark.parametrize("prior", [0.0, 4.0, 100.0])
def test_outputs_equal_normalisation_with_the_mixed_statistics(prior):
    model = bn_model()
    x = torch.randn(12, 5, dtype=torch.float64) * 2 + 1
    expected = slow_forward(bn_model(), x, prior)
    out = sdk.create("adapter", "bn_adapt", prior=prior).adapt(model, x)
    assert torch.allclose(out, expected, atol=1e-10)


def test_full_adaptation_is_batchnorm_in_training_mode_and_the_prior_stays_the_source():
    model = bn_model()
    a, b = torch.randn(10, 5, dtype=torch.float64) + 3, torch.randn(7, 5, dtype=torch.float64)
    train_mode = copy.deepcopy(model).train()
    adapter = sdk.create("adapter", "bn_adapt")
    assert adapter.prior == 0.0
    assert torch.allclose(adapter.adapt(model, a), train_mode(a).detach(), atol=1e-10)
    mixed = sdk.create("adapter", "bn_adapt", prior=8.0)
    fresh = bn_model()
    mixed.adapt(fresh, a)  # a first batch must not move the prior of the next
    assert torch.allclose(mixed.adapt(fresh, b), slow_forward(bn_model(), b, 8.0), atol=1e-10)


def test_a_model_without_batchnorm_is_refused():
    with pytest.raises(sdk.ConfigError, match="'bn_adapt': the model has no BatchNorm layer"):
        sdk.create("adapter", "bn_adapt").adapt(nn.Linear(3, 2), torch.randn(4, 3))
