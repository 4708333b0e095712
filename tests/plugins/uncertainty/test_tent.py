"""tent against a hand-written forward (float64, batch statistics) whose entropy gradient
with respect to the BN scale and shift gives the expected optimizer step."""

import pytest
import torch
from torch import nn

import sdk


def bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    model(torch.randn(64, 5, dtype=torch.float64))  # running statistics of "training" data
    return model.eval()


def slow_entropy_grads(model, x):
    lin, bn, _, out = model
    gamma = bn.weight.detach().clone().requires_grad_()
    beta = bn.bias.detach().clone().requires_grad_()
    h = lin(x).detach()
    mean, var = h.mean(0), ((h - h.mean(0)) ** 2).mean(0)
    z = out(torch.relu((h - mean) / torch.sqrt(var + bn.eps) * gamma + beta))
    p = z.softmax(1)
    entropy = -(p * p.log()).sum(1).mean()
    return z.detach(), torch.autograd.grad(entropy, (gamma, beta))


def test_one_sgd_step_descends_the_entropy_of_batch_normalised_outputs():
    model, reference = bn_model(), bn_model()
    x = torch.randn(16, 5, dtype=torch.float64) * 2 + 1
    z, (g_gamma, g_beta) = slow_entropy_grads(reference, x)
    tent = sdk.create("adapter", "tent", optimizer="sgd", momentum=0.0, lr=0.1)
    out = tent.adapt(model, x)
    assert torch.allclose(out, z, atol=1e-10)  # the outputs the step was computed on
    assert torch.allclose(model[1].weight, reference[1].weight - 0.1 * g_gamma, atol=1e-10)
    assert torch.allclose(model[1].bias, reference[1].bias - 0.1 * g_beta, atol=1e-10)
    for name in ("0.weight", "0.bias", "3.weight", "3.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name]), name
    # only the BN affine parameters are optimised: nothing else is left holding a gradient
    assert all(p.grad is None and not p.requires_grad for p in (*model[0].parameters(), *model[3].parameters()))


def test_the_default_is_one_adam_step_of_lr_1e_3_and_reset_is_episodic():
    model, reference = bn_model(), bn_model()
    x = torch.randn(16, 5, dtype=torch.float64)
    _, (g_gamma, _) = slow_entropy_grads(reference, x)
    tent = sdk.create("adapter", "tent")
    first = tent.adapt(model, x)
    # Adam's first step is lr * g / (|g| + eps): lr * sign(g) away from zero gradients
    assert torch.allclose(model[1].weight, reference[1].weight - 1e-3 * g_gamma / (g_gamma.abs() + 1e-8), atol=1e-9)
    tent.adapt(model, x)
    tent.reset()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert not model.training and model[1].track_running_stats and model[0].weight.requires_grad
    assert torch.allclose(tent.adapt(model, x), first)


def test_bad_models_and_batches_are_refused():
    with pytest.raises(sdk.ConfigError, match="'tent': the model's BatchNorm layers have no affine"):
        sdk.create("adapter", "tent").adapt(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False)),
                                            torch.randn(5, 3))
    with pytest.raises(sdk.ShapeError, match="'tent': a batch of one row"):
        sdk.create("adapter", "tent").adapt(bn_model(), torch.randn(1, 5, dtype=torch.float64))
