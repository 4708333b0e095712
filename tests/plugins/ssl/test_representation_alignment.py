"""REPA (representation_alignment) against an explicit loop, its analytic optimum and its inputs."""

import pytest
import torch

import sdk
from sdk.keys import FEATURES, TARGET_FEATURES, TEACHER


def slow(h, y, params, weight):
    """weight * mean_n -cos(W3 silu(W2 silu(W1 h_n + b1) + b2) + b3, y_n), loops over rows."""
    w1, b1, w2, b2, w3, b3 = params
    total = 0
    for n in range(h.shape[0]):
        x = torch.nn.functional.silu(w1 @ h[n] + b1)
        x = torch.nn.functional.silu(w2 @ x + b2)
        x = w3 @ x + b3
        cos = sum(x[d] * y[n, d] for d in range(y.shape[1])) / (x.norm() * y[n].norm())
        total = total - cos
    return weight * total / h.shape[0]


def params(obj):
    p = obj.projector
    return [p.w1, p.b1, p.w2, p.b2, p.w3, p.b3]


def test_value_and_gradients_match_loop_and_the_target_gets_none():
    g = torch.Generator().manual_seed(0)
    obj = sdk.create("objective", "representation_alignment", weight=0.7, projector_dim=6).double()
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = obj(sdk.Views(embeddings=(h,)), sdk.Batch(extras={TARGET_FEATURES: y}))
    want = slow(h, y.detach(), params(obj), 0.7)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    leaves = [h, *params(obj)]
    got = torch.autograd.grad(loss.value, leaves + [y], allow_unused=True)
    expected = torch.autograd.grad(want, leaves)
    for a, e in zip(got, expected):
        assert torch.allclose(a, e, atol=1e-10)
    assert got[-1] is None  # the frozen encoder's features are a fixed target
    assert obj.projector.w3.shape == (3, 6) and torch.equal(obj.projector.b1, torch.zeros(6,
                                                                                      dtype=torch.float64))


def test_aligned_projection_gives_minus_weight():
    obj = sdk.create("objective", "representation_alignment", projector_dim=8)
    h = torch.randn(6, 4)
    obj(sdk.Views(embeddings=(h,)), sdk.Batch(extras={TARGET_FEATURES: torch.randn(6, 3)}))
    with torch.no_grad():
        y = 2.5 * obj.projector(h, 3)  # any positive multiple of the projection is aligned
    loss = obj(sdk.Views(embeddings=(h,)), sdk.Batch(extras={TARGET_FEATURES: y}))
    assert loss.value.item() == pytest.approx(-0.5, abs=1e-6)
    assert torch.allclose(loss.per_sample, torch.full((6,), -0.5), atol=1e-6)


def test_features_and_teacher_take_precedence_and_views_are_averaged():
    g = torch.Generator().manual_seed(1)
    obj = sdk.create("objective", "representation_alignment", weight=1.0, projector_dim=5).double()
    z1, z2 = (torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(2))
    f1, f2 = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t1, t2 = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(2))
    views = sdk.Views(embeddings=(z1, z2), extras={FEATURES: (f1, f2), TEACHER: (t1, t2)})
    other = torch.randn(4, 2, generator=g, dtype=torch.float64)
    loss = obj(views, sdk.Batch(extras={TARGET_FEATURES: other}))
    p = params(obj)
    want = (slow(f1, t1, p, 1.0) + slow(f2, t2, p, 1.0)) / 2
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)


def test_missing_or_misshapen_targets_are_clear_errors():
    obj = sdk.create("objective", "representation_alignment")
    h = torch.randn(4, 3)
    with pytest.raises(sdk.RequirementError, match="target_features"):
        obj(sdk.Views(embeddings=(h,)))
    with pytest.raises(sdk.ShapeError, match=r"target_features'\] must be floating \[4, Dz\]"):
        obj(sdk.Views(embeddings=(h,)), sdk.Batch(extras={TARGET_FEATURES: torch.randn(5, 2)}))
    assert (obj.weight, obj.projector.hidden) == (0.5, 2048)
