"""focal_loss against a written-out loop (value and gradient); gamma = 0 is cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk


def slow_softmax(z, y, gamma):
    rows = []
    for i in range(z.shape[0]):
        lse = torch.log(sum(torch.exp(z[i, k]) for k in range(z.shape[1])))
        p = torch.exp(z[i, y[i]] - lse)
        rows.append(-(1 - p) ** gamma * torch.log(p))
    return torch.stack(rows)


def slow_sigmoid(z, y, gamma, alpha):
    rows = []
    for i in range(z.shape[0]):
        total = 0.0
        for k in range(z.shape[1]):
            p = 1 / (1 + torch.exp(-z[i, k]))
            pt, at = (p, alpha) if y[i, k] == 1 else (1 - p, 1 - alpha)
            total = total - at * (1 - pt) ** gamma * torch.log(pt)
        rows.append(total)
    return torch.stack(rows)


def grads(f, z):
    z = z.clone().requires_grad_()
    value = f(z)
    return value.detach(), torch.autograd.grad(value.sum(), z)[0]


@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_softmax_matches_loop(gamma):
    g = torch.Generator().manual_seed(0)
    z, y = 2 * torch.randn(7, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2, 0, 3])
    obj = sdk.create("objective", "focal_loss", gamma=gamma)
    got, got_g = grads(lambda t: obj(sdk.Views(logits=t), sdk.Batch(targets=y)).per_sample, z)
    want, want_g = grads(lambda t: slow_softmax(t, y, gamma), z)
    assert torch.allclose(got, want, rtol=1e-10) and torch.allclose(got_g, want_g, rtol=1e-9)


def test_sigmoid_matches_loop():
    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(6, 3, generator=g) > 0.6).double()
    obj = sdk.create("objective", "focal_loss", sigmoid=True, alpha=0.25)
    got, got_g = grads(lambda t: obj(sdk.Views(logits=t), sdk.Batch(targets=y)).per_sample, z)
    want, want_g = grads(lambda t: slow_sigmoid(t, y, 2.0, 0.25), z)
    assert torch.allclose(got, want, rtol=1e-10) and torch.allclose(got_g, want_g, rtol=1e-9)
    ids = torch.tensor([0, 2, 1, 1, 0, 2])  # ids are one-hot sets
    assert torch.allclose(obj(sdk.Views(logits=z), sdk.Batch(targets=ids)).per_sample,
                          slow_sigmoid(z, F.one_hot(ids, 3), 2.0, 0.25))


def test_gamma_zero_is_cross_entropy_with_weights_and_ignored_ids():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.tensor([0, 4, -100, 1, 2, 3, 4, -100, 0])
    w = (0.5, 1.0, 2.0, 1.5, 3.0)
    loss = sdk.create("objective", "focal_loss", gamma=0.0, class_weights=w, ignore_index=-100)(
        sdk.Views(logits=z), sdk.Batch(targets=y))
    want = F.cross_entropy(z, y, weight=torch.tensor(w, dtype=torch.float64), ignore_index=-100)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-12)
    assert loss.per_sample[2] == 0 and loss.per_sample[7] == 0
    soft = torch.softmax(torch.randn(9, 5, generator=g, dtype=torch.float64), -1)
    value = sdk.create("objective", "focal_loss", gamma=0.0, class_weights=w)(
        sdk.Views(logits=z), sdk.Batch(targets=soft)).value
    assert value.item() == pytest.approx(
        F.cross_entropy(z, soft, weight=torch.tensor(w, dtype=torch.float64)).item(), rel=1e-12)
    bce = sdk.create("objective", "focal_loss", gamma=0.0, sigmoid=True)(
        sdk.Views(logits=z), sdk.Batch(targets=(soft > 0.2).double())).value
    want = F.binary_cross_entropy_with_logits(z, (soft > 0.2).double(), reduction="sum") / 9
    assert bce.item() == pytest.approx(want.item(), rel=1e-12)


def test_down_weights_easy_samples():
    # an easy sample (p_t = 0.9) loses a factor (1 - 0.9)^2 = 0.01 against cross-entropy
    z = torch.tensor([[math.log(9.0), 0.0]], dtype=torch.float64)
    loss = sdk.create("objective", "focal_loss")(sdk.Views(logits=z), sdk.Batch(targets=torch.tensor([0])))
    assert loss.value.item() == pytest.approx(-0.01 * math.log(0.9), rel=1e-12)


def test_saturated_logits_keep_finite_gradients():
    z = torch.tensor([[1e4, 0.0], [0.0, 1e4]], requires_grad=True)
    loss = sdk.create("objective", "focal_loss", gamma=0.5)(sdk.Views(logits=z),
                                                             sdk.Batch(targets=torch.tensor([0, 0])))
    loss.value.backward()
    assert torch.isfinite(z.grad).all() and z.grad[1, 0] < 0


def test_errors():
    with pytest.raises(sdk.ConfigError, match="alpha weighs positives"):
        sdk.create("objective", "focal_loss", alpha=0.25)
    with pytest.raises(sdk.ConfigError, match="class_weights weigh the softmax form"):
        sdk.create("objective", "focal_loss", sigmoid=True, class_weights=(1.0, 2.0))
    with pytest.raises(sdk.ConfigError, match="non-negative with a positive sum"):
        sdk.create("objective", "focal_loss", class_weights=(1.0, -2.0))
    obj = sdk.create("objective", "focal_loss", class_weights=(1.0, 2.0))
    with pytest.raises(sdk.ShapeError, match="focal_loss: class_weights has 2 entries, but the logits have 3"):
        obj(sdk.Views(logits=torch.zeros(2, 3)), sdk.Batch(targets=torch.tensor([0, 1])))
    with pytest.raises(sdk.ShapeError, match=r"multi-label sets must lie in \[0, 1\]"):
        sdk.create("objective", "focal_loss", sigmoid=True)(
            sdk.Views(logits=torch.zeros(2, 3)), sdk.Batch(targets=torch.full((2, 3), 2.0)))
