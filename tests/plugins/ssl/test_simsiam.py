"""SimSiam against an explicit float64 loop (value and gradient) and its stop-gradient."""

import math

import pytest
import torch

import sdk


def slow(preds, projections, stop_gradient=True):
    """D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D = -cos, as scalar loops."""
    (p1, p2), (z1, z2) = preds, projections
    n, d = p1.shape

    def neg_cos(p, z, i):
        zz = [float(z[i, k].detach()) for k in range(d)] if stop_gradient else [z[i, k] for k in range(d)]
        dot = sum(p[i, k] * zz[k] for k in range(d))
        norm_z = math.sqrt(sum(x * x for x in zz)) if stop_gradient else torch.sqrt(
            sum(x * x for x in zz))
        return -dot / (torch.sqrt(sum(p[i, k] ** 2 for k in range(d))) * norm_z)

    return sum(neg_cos(p1, z2, i) / 2 + neg_cos(p2, z1, i) / 2 for i in range(n)) / n


def test_value_and_gradient_match_the_loop_and_the_target_is_detached():
    torch.manual_seed(0)
    obj = sdk.create("objective", "simsiam", dim=3, hidden_dim=2).double()
    g = torch.Generator().manual_seed(1)
    z = tuple(torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    loss = obj(sdk.Views(embeddings=z)).value
    want = slow([obj.predictor(v) for v in z], z)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    params = list(obj.parameters())
    for a, b in zip(torch.autograd.grad(loss, [*z, *params]), torch.autograd.grad(want, [*z, *params])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # without the stop-gradient the gradient with respect to z would differ
    full = slow([obj.predictor(v) for v in z], z, stop_gradient=False)
    ours = torch.autograd.grad(obj(sdk.Views(embeddings=z)).value, z)
    assert not torch.allclose(torch.autograd.grad(full, z)[0], ours[0])


def test_paper_sizes_bottleneck_predictor_without_norm_at_its_output():
    obj = sdk.create("objective", "simsiam")
    net = obj.predictor.net
    assert [type(m).__name__ for m in net] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (net[0].in_features, net[0].out_features, net[-1].out_features) == (2048, 512, 2048)
    assert net[0].bias is None and net[-1].bias is not None


def test_minimum_is_minus_one_and_views_average():
    obj = sdk.create("objective", "simsiam", dim=3, hidden_dim=4).eval()
    z = torch.randn(5, 3)
    p = obj.predictor(z).detach()
    # a predictor output parallel to the other view's projection: D = -1
    assert obj(sdk.Views(embeddings=(z, z))).value.item() >= -1 - 1e-6
    from plugins.ssl.simsiam import simsiam_loss
    assert simsiam_loss([p, p], [2 * p, 3 * p]).mean().item() == pytest.approx(-1.0, abs=1e-6)
    a, b, c = (torch.randn(5, 3) for _ in range(3))
    pa, pb, pc = (obj.predictor(v) for v in (a, b, c))
    three = obj(sdk.Views(embeddings=(a, b, c))).value
    pairs = [simsiam_loss([x, y], [u, w]) for (x, u), (y, w) in
             [((pa, a), (pb, b)), ((pa, a), (pc, c)), ((pb, b), (pc, c))]]
    torch.testing.assert_close(three, torch.stack(pairs).mean())
