"""BYOL against an explicit float64 loop (value and gradient), its predictor and its teacher."""

import math

import pytest
import torch

import sdk
from sdk import keys


def slow(preds, targets):
    """The paper's L + L~: per sample, ||p/|p| - t/|t| ||^2 for each view's prediction against
    the other view's target, as scalar loops (autograd differentiates the loop)."""
    (p1, p2), (t1, t2) = preds, targets
    n, d = p1.shape

    def sq(p, t, i):
        t = t.detach()
        np_ = torch.sqrt(sum(p[i, k] ** 2 for k in range(d)))
        nt = math.sqrt(sum(float(t[i, k]) ** 2 for k in range(d)))  # a constant: stop-gradient
        return sum((p[i, k] / np_ - float(t[i, k]) / nt) ** 2 for k in range(d))

    return sum(sq(p1, t2, i) + sq(p2, t1, i) for i in range(n)) / n


def _inputs(obj, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = obj.predictor.dim
    z = tuple(torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    t = tuple(torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    return z, t


def test_value_and_gradient_match_the_loop():
    torch.manual_seed(0)
    obj = sdk.create("objective", "byol", dim=3, hidden_dim=5).double()
    z, t = _inputs(obj)
    loss = obj(sdk.Views(embeddings=z, extras={keys.TEACHER: t}))
    preds = [obj.predictor(v) for v in z]
    want = slow(preds, t)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    params = list(obj.parameters())
    got = torch.autograd.grad(loss.value, [*z, *params])
    ref = torch.autograd.grad(want, [*z, *params])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # the targets are the teacher's: no gradient reaches them
    assert torch.autograd.grad(obj(sdk.Views(embeddings=z, extras={keys.TEACHER: t})).value, t,
                               allow_unused=True) == (None, None)


def test_paper_sizes_and_predictor_without_norm_at_its_output():
    obj = sdk.create("objective", "byol")
    net = obj.predictor.net
    assert [type(m).__name__ for m in net] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (net[0].in_features, net[0].out_features, net[-1].out_features) == (256, 4096, 256)


def test_a_perfect_prediction_costs_nothing_and_an_opposite_one_eight():
    obj = sdk.create("objective", "byol", dim=3, hidden_dim=4).eval()
    z = torch.randn(4, 3)
    p = obj.predictor(z).detach()
    zero = obj(sdk.Views(embeddings=(z, z), extras={keys.TEACHER: (3 * p, 2 * p)})).value
    eight = obj(sdk.Views(embeddings=(z, z), extras={keys.TEACHER: (-p, -p)})).value
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and eight.item() == pytest.approx(8.0, rel=1e-6)


def test_needs_the_teachers_outputs_of_each_view():
    obj = sdk.create("objective", "byol", dim=3, hidden_dim=4)
    z = (torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(sdk.RequirementError, match="'byol'.*teacher"):
        obj(sdk.Views(embeddings=z))
    with pytest.raises(sdk.ShapeError, match="'byol'.*teacher.*2 views, got 1"):
        obj(sdk.Views(embeddings=z, extras={keys.TEACHER: (z[0],)}))
    with pytest.raises(sdk.ShapeError, match="'byol'.*teacher.*\\[1\\].*\\[4, 3\\].*\\[4, 5\\]"):
        obj(sdk.Views(embeddings=z, extras={keys.TEACHER: (z[0], torch.randn(4, 5))}))
    with pytest.raises(sdk.ShapeError, match="'byol'.*\\[B, 3\\]"):
        obj(sdk.Views(embeddings=(torch.randn(4, 2),) * 2, extras={keys.TEACHER: (torch.randn(4, 2),) * 2}))
