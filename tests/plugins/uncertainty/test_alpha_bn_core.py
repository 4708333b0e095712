"""alpha_bn_core against hand-written forwards (float64): alpha = 1 is the eval-mode model,
alpha = 0 the model with batch statistics, any alpha the mixed statistics; Core's loss against
a loop over the class-correlation matrix and its Adam step against the gradient of that loop.
On digits under a covariate shift (contrast x0.5 plus N(0, 0.1) noise), batches of 16,
measured accuracy (source BN / test BN / alpha-BN / Core) for seeds 0, 1, 2:
.798/.858/.863/.863, .806/.868/.877/.875, .818/.877/.883/.883."""

import copy

import pytest
import torch
from torch import nn

import sdk


def bn_model(seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def batch(conv=False, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 6, 6) if conv else (n, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1


def slow_forward(model, x, alpha, affine=None):
    """The model's forward with every BN written out: channel by channel, mean and biased
    variance over the batch (and positions), mixed with the running statistics; ``affine``
    maps a BN layer's position to its (gamma, beta)."""
    out = x
    for i, layer in enumerate(model):
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            out = layer(out)
            continue
        gamma, beta = (affine or {}).get(i, (layer.weight, layer.bias))
        channels = []
        for c in range(out.shape[1]):
            v = out[:, c]
            mean = v.mean()
            var = ((v - mean) ** 2).mean()
            mu = alpha * layer.running_mean[c] + (1 - alpha) * mean
            sigma2 = alpha * layer.running_var[c] + (1 - alpha) * var
            channels.append((v - mu) / torch.sqrt(sigma2 + layer.eps) * gamma[c] + beta[c])
        out = torch.stack(channels, 1)
    return out


def slow_core_loss(logits):
    p = logits.softmax(1)
    n, c = p.shape
    a = [[sum(p[i, j] * p[i, k] for i in range(n)) for k in range(c)] for j in range(c)]
    return -sum(torch.log(a[j][j] / sum(a[j])) for j in range(c)) / c


@pytest.mark.parametrize("conv", [False, True])
def test_alpha_one_is_the_eval_mode_model_and_alpha_zero_is_batch_statistics(conv):
    x = batch(conv)
    source = sdk.create("adapter", "alpha_bn_core", alpha=1.0, steps=0).adapt(bn_model(conv=conv), x)
    assert torch.equal(source, bn_model(conv=conv)(x).detach())
    test_bn = sdk.create("adapter", "alpha_bn_core", alpha=0.0, steps=0).adapt(bn_model(conv=conv), x)
    assert torch.allclose(test_bn, bn_model(conv=conv).train()(x).detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.8])
def test_outputs_equal_normalisation_with_the_mixed_statistics(alpha, conv):
    model, x = bn_model(conv=conv), batch(conv)
    out = sdk.create("adapter", "alpha_bn_core", alpha=alpha, steps=0).adapt(model, x)
    assert torch.allclose(out, slow_forward(bn_model(conv=conv), x, alpha).detach(), atol=1e-10)
    reference = bn_model(conv=conv)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_core_loss_equals_the_class_correlation_loop_in_value_and_gradient():
    z = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    from plugins.uncertainty.alpha_bn_core import core_loss
    fast, slow = core_loss(z1), slow_core_loss(z2)
    assert torch.allclose(fast, slow, atol=1e-12)
    (g1,), (g2,) = torch.autograd.grad(fast, z1), torch.autograd.grad(slow, z2)
    assert torch.allclose(g1, g2, atol=1e-12)
    # diagonal, class-balanced confident predictions are the minimum (0); a collapse onto one
    # class is penalised through the classes left without mass
    assert core_loss(torch.eye(4, dtype=torch.float64).repeat(2, 1) * 50) < 1e-12
    collapsed = torch.zeros(8, 4, dtype=torch.float64)
    collapsed[:, 0] = 5
    assert core_loss(collapsed) > 1.0


def test_the_default_is_alpha_0_1_and_one_adam_step_of_lr_1e_3_on_the_core_loss():
    model, reference, x = bn_model(), bn_model(), batch()
    bn = reference[1]
    gamma = bn.weight.detach().clone().requires_grad_()
    beta = bn.bias.detach().clone().requires_grad_()
    z = slow_forward(reference, x, 0.1, {1: (gamma, beta)})
    g_gamma, g_beta = torch.autograd.grad(slow_core_loss(z), (gamma, beta))
    adapter = sdk.create("adapter", "alpha_bn_core")
    assert (adapter.alpha, adapter.steps, adapter.lr) == (0.1, 1, 1e-3)
    out = adapter.adapt(model, x)
    assert torch.allclose(out, z.detach(), atol=1e-10)  # the outputs the step was computed on
    # Adam's first step is lr * g / (|g| + eps)
    assert torch.allclose(model[1].weight, bn.weight - 1e-3 * g_gamma / (g_gamma.abs() + 1e-8), atol=1e-9)
    assert torch.allclose(model[1].bias, bn.bias - 1e-3 * g_beta / (g_beta.abs() + 1e-8), atol=1e-9)
    for name in ("0.weight", "0.bias", "3.weight", "3.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name]), name
    assert all(p.grad is None and not p.requires_grad for p in (*model[0].parameters(), *model[3].parameters()))


def test_one_sgd_step_descends_the_core_loss_through_the_mixed_batch_statistics():
    """Two BN layers: the first one's scale and shift move the second one's batch moments, so
    the gradient must flow through those moments."""
    def two_bn(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4),
                              nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
        with torch.no_grad():
            for bn in (model[1], model[4]):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        return model.eval()

    model, reference, x = two_bn(), two_bn(), batch()
    affine = {i: (reference[i].weight.detach().clone().requires_grad_(),
                  reference[i].bias.detach().clone().requires_grad_()) for i in (1, 4)}
    flat = [t for pair in affine.values() for t in pair]
    grads = torch.autograd.grad(slow_core_loss(slow_forward(reference, x, 0.3, affine)), flat)
    sdk.create("adapter", "alpha_bn_core", alpha=0.3, optimizer="sgd", momentum=0.0, lr=0.1).adapt(model, x)
    adapted = [model[1].weight, model[1].bias, model[4].weight, model[4].bias]
    for new, old, g in zip(adapted, flat, grads):
        assert torch.allclose(new, old - 0.1 * g, atol=1e-10)


def test_reset_restores_the_model_and_the_next_adapt_repeats_the_first():
    model, x = bn_model(), batch()
    adapter = sdk.create("adapter", "alpha_bn_core", steps=2)
    first = adapter.adapt(model, x)
    adapter.adapt(model, x)
    adapter.reset()
    reference = bn_model()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert model[0].weight.requires_grad and model[1].weight.requires_grad
    assert torch.allclose(adapter.adapt(model, x), first)
    # no hook is left on the model between calls: a plain call is the source model
    assert torch.equal(bn_model()(x), reference(x))
    assert not model[1]._forward_hooks


def test_bad_parameters_models_and_batches_are_refused():
    with pytest.raises(sdk.ConfigError, match="alpha"):
        sdk.create("adapter", "alpha_bn_core", alpha=1.5)
    with pytest.raises(sdk.ConfigError, match="steps"):
        sdk.create("adapter", "alpha_bn_core", steps=-1)
    with pytest.raises(sdk.ConfigError, match="'alpha_bn_core': the model has no BatchNorm layer"):
        sdk.create("adapter", "alpha_bn_core").adapt(nn.Linear(3, 2), torch.randn(4, 3))
    with pytest.raises(sdk.ConfigError, match="'alpha_bn_core': every BatchNorm layer must track"):
        sdk.create("adapter", "alpha_bn_core").adapt(
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)), torch.randn(5, 3))
    with pytest.raises(sdk.ConfigError, match="'alpha_bn_core': the model's BatchNorm layers have no affine"):
        sdk.create("adapter", "alpha_bn_core").adapt(
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False)).eval(), torch.randn(5, 3))
    with pytest.raises(sdk.ShapeError, match="'alpha_bn_core': with alpha = 0 a batch of one row"):
        sdk.create("adapter", "alpha_bn_core", alpha=0.0).adapt(bn_model(), batch(n=1))
    with pytest.raises(sdk.ShapeError, match=r"'alpha_bn_core': the model's outputs must be logits \[B, C\]"):
        sdk.create("adapter", "alpha_bn_core").adapt(nn.Sequential(nn.Linear(5, 1), nn.BatchNorm1d(1)).eval(),
                                                     torch.randn(6, 5))
    # a single row is fine once the source statistics take part
    assert sdk.create("adapter", "alpha_bn_core", steps=0).adapt(bn_model(), batch(n=1)).shape == (1, 3)


def stream_accuracy(model, adapter, x, y, batch_size=16):
    model = copy.deepcopy(model)
    out = torch.cat([adapter.adapt(model, x[idx]) for idx in torch.arange(len(y)).split(batch_size)])
    return float((out.argmax(1) == y).float().mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_bn_beats_source_and_test_batch_statistics_under_covariate_shift(seed, digits):
    model, x, y = digits
    xs = 0.5 * x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    acc = {alpha: stream_accuracy(model, sdk.create("adapter", "alpha_bn_core", alpha=alpha, steps=0), xs, y)
           for alpha in (1.0, 0.0, 0.1)}
    core = stream_accuracy(model, sdk.create("adapter", "alpha_bn_core"), xs, y)
    assert acc[0.0] > acc[1.0] + 0.04  # the shift is one batch statistics correct
    assert acc[0.1] > acc[0.0] and acc[0.1] > acc[1.0]
    assert core >= acc[0.1] - 0.005  # Core's step does not undo alpha-BN's gain
