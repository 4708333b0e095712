"""cacr: value and gradients against a double loop written from the reference code, the
uniform-weight identity at zero temperatures, and the direction of the conditional weights."""

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.cacr import cacr_loss, conditional_expectation


def slow_cacr(views, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0):
    """Reference semantics, one query at a time (differentiable)."""
    z = [F.normalize(v.double(), dim=1) for v in views]
    n_views, b = len(z), z[0].shape[0]
    attract = 0.0
    for x in range(n_views):
        for i in range(b):
            d = torch.stack([(z[x][i] - z[k][i]).pow(2).sum() for k in range(n_views) if k != x])
            attract = attract + (torch.softmax(tau_pos * d, 0) * alpha * d).sum() / (n_views * b)
    repel, pairs = 0.0, 0
    for x in range(n_views):
        for y in range(x + 1, n_views):
            pairs += 1
            for i in range(b):
                d = torch.stack([(z[x][i] - z[y][j]).pow(2).sum() for j in range(b) if j != i])
                repel = repel + (torch.softmax(-tau_neg * d, 0) * (-beta) * d).sum() / b
    return attract + repel / pairs


@pytest.mark.parametrize("n_views", [2, 3, 5])
def test_value_and_gradient_match_loop(n_views):
    g = torch.Generator().manual_seed(n_views)
    views = [torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
             for _ in range(n_views)]
    got = cacr_loss(*views, alpha=0.7, beta=1.3, tau_pos=2.0, tau_neg=0.5)
    ref = slow_cacr(views, 0.7, 1.3, 2.0, 0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(got, views), torch.autograd.grad(ref, views)):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)  # weights are not detached


def test_zero_temperatures_give_uniform_means():
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(6, 3, generator=g) for _ in range(3)]
    z = [F.normalize(v, dim=1) for v in views]
    pos = [(z[x] - z[k]).pow(2).sum(1) for x in range(3) for k in range(3) if k != x]
    off = ~torch.eye(6, dtype=torch.bool)
    neg = [torch.cdist(z[x], z[y]).pow(2)[off] for x in range(3) for y in range(x + 1, 3)]
    expected = torch.cat(pos).mean() - torch.cat(neg).mean()
    got = cacr_loss(*views, tau_pos=0.0, tau_neg=0.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_weights_favour_far_positives_and_close_negatives():
    d = torch.tensor([[0.1, 0.5, 1.2, 2.0]])
    mask = torch.ones_like(d, dtype=torch.bool)
    eye = torch.eye(4)
    pi_pos = torch.cat([conditional_expectation(1.0 * d, e, mask)[0] for e in eye])
    pi_neg = torch.cat([conditional_expectation(-1.0 * d, e, mask)[0] for e in eye])
    assert torch.all(pi_pos[1:] > pi_pos[:-1]) and torch.all(pi_neg[1:] < pi_neg[:-1])
    assert pi_pos.sum().item() == pytest.approx(1.0) and pi_neg.sum().item() == pytest.approx(1.0)
    # hence the weighted terms exceed the uniform ones (weights increase with the cost)
    g = torch.Generator().manual_seed(3)
    views = sdk.Views(embeddings=tuple(torch.randn(8, 4, generator=g) for _ in range(3)))
    weighted = sdk.create("objective", "cacr")(views).logs
    uniform = sdk.create("objective", "cacr", tau_pos=0.0, tau_neg=0.0)(views).logs
    assert weighted["attraction"] > uniform["attraction"]
    assert weighted["repulsion"] > uniform["repulsion"]


def test_per_sample_and_sampler_path():
    g = torch.Generator().manual_seed(4)
    views = sdk.Views(embeddings=tuple(torch.randn(6, 4, generator=g) for _ in range(3)))
    loss = sdk.create("objective", "cacr")(views)
    assert torch.allclose(loss.per_sample.mean(), loss.value)
    explicit = sdk.create("objective", "cacr", sampler=sdk.create("sampler", "same_index"))(views)
    assert torch.allclose(explicit.value, loss.value)
    with pytest.raises(sdk.ConfigError, match="tau_neg"):
        sdk.create("objective", "cacr", tau_neg=-1.0)


@pytest.mark.parametrize("param", ["alpha", "beta", "tau_pos", "tau_neg"])
def test_negative_parameters_name_the_field(param):
    with pytest.raises(sdk.ConfigError, match=param):
        sdk.create("objective", "cacr", **{param: -0.5})
