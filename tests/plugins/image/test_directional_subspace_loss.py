"""directional_subspace_loss: least-squares projections, the loss against a slow per-sample loop,
its zero set, and descent from the source embedding to the orthogonal projection."""

import math

import pytest
import torch

import sdk
from plugins.image.directional_subspace_loss import project, subspace_basis
from sdk import keys


def _refs(seed=0, shots=(3, 5), dim=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, dim, generator=g, dtype=torch.float64) for k in shots]


def _lstsq_projection(e, refs, affine):
    """argmin_w |e - o - Mᵀ w|^2 by torch.linalg.lstsq, one embedding at a time."""
    o = refs.mean(0) if affine else torch.zeros(refs.shape[1], dtype=refs.dtype)
    m = (refs - o).T
    return torch.stack([o + m @ torch.linalg.lstsq(m, (x - o)[:, None], driver="gelsd").solution[:, 0] for x in e])


def _slow_loss(adapted, source, refs, weights, lam, affine=False):
    total = []
    for b in range(adapted.shape[0]):
        dist = direction = 0.0
        for r, a in zip(refs, weights):
            pa = _lstsq_projection(adapted[b:b + 1], r, affine)[0]
            ps = _lstsq_projection(source[b:b + 1], r, affine)[0]
            u, v = adapted[b] - source[b], ps - source[b]
            dist = dist + a * ((adapted[b] - pa) ** 2).sum()
            direction = direction + a * (1 - (u @ v) / (u.norm() * v.norm()))
        total.append(dist + lam * direction)
    return torch.stack(total)


@pytest.mark.parametrize("affine", [False, True])
def test_projection_is_the_least_squares_one(affine):
    refs = _refs()[1]
    rank_deficient = torch.cat([refs, (refs[:2] + refs[2:4]) / 2])  # 7 rows, 5 points' hull
    e = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for r in (refs, rank_deficient):
        origin, basis = subspace_basis(r, affine)
        got = project(e, origin[None], basis[None])[0]
        torch.testing.assert_close(got, _lstsq_projection(e, r, affine), rtol=1e-9, atol=1e-10)
    # a projection: idempotent, and the residual is orthogonal to the subspace
    origin, basis = subspace_basis(rank_deficient, affine)
    p = project(e, origin[None], basis[None])[0]
    torch.testing.assert_close(project(p, origin[None], basis[None])[0], p)
    assert ((e - p) @ (rank_deficient - origin).T).abs().max() < 1e-9
    assert int((basis.abs().sum(0) > 0).sum()) == (4 if affine else 5)


def test_loss_and_gradient_equal_the_slow_loop_with_unequal_weights():
    refs = _refs()
    g = torch.Generator().manual_seed(2)
    source = torch.randn(5, 8, generator=g, dtype=torch.float64)
    adapted = source + 0.5 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    obj = sdk.create("objective", "directional_subspace_loss", references=refs, weights=(1.0, 3.0),
                     direction_weight=0.7)
    a1, a2 = adapted.clone().requires_grad_(), adapted.clone().requires_grad_()
    s1 = source.clone().requires_grad_()
    loss = obj(sdk.Views(embeddings=(a1,), extras={keys.TEACHER: (s1,)}))
    slow = _slow_loss(a2, source, refs, (0.25, 0.75), 0.7)
    torch.testing.assert_close(loss.per_sample, slow, rtol=1e-9, atol=1e-10)
    loss.value.backward()
    slow.mean().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-8, atol=1e-10)
    assert s1.grad is None  # the frozen source gets no gradient
    affine = sdk.create("objective", "directional_subspace_loss", references=refs, affine=True)
    torch.testing.assert_close(
        affine(sdk.Views(embeddings=(adapted,), extras={keys.TEACHER: (source,)})).per_sample,
        _slow_loss(adapted, source, refs, (0.5, 0.5), 1.0, affine=True), rtol=1e-9, atol=1e-10)


def test_defaults_and_the_zero_set_of_each_term():
    refs = _refs(shots=(3,))
    obj = sdk.create("objective", "directional_subspace_loss", references=refs)
    assert (obj.direction_weight, obj.affine) == (1.0, False)
    torch.testing.assert_close(obj.weights, torch.ones(1))
    two = sdk.create("objective", "directional_subspace_loss", references=_refs())
    torch.testing.assert_close(two.weights, torch.full((2,), 0.5))
    g = torch.Generator().manual_seed(3)
    source = torch.randn(4, 8, generator=g, dtype=torch.float64)
    origin, basis = subspace_basis(refs[0])
    perp = project(source, origin[None], basis[None])[0] - source
    for t, dist, direction in ((1.0, 0.0, 0.0), (0.4, None, 0.0), (-0.5, None, 2.0)):
        adapted = source + t * perp  # along (t > 0) or against (t < 0) the perpendicular
        loss = obj(sdk.Views(embeddings=(adapted,), extras={keys.TEACHER: (source,)}))
        torch.testing.assert_close(loss.logs["direction"], torch.tensor(direction, dtype=torch.float64),
                                   atol=1e-12, rtol=0)
        if dist is not None:  # at t = 1, e' = P e: on the subspace, so no distance either
            assert loss.logs["distance"] < 1e-20 and loss.value < 1e-12
        else:
            torch.testing.assert_close(loss.logs["distance"], ((1 - t) * perp).pow(2).sum(1).mean())
    # a step off the perpendicular (along the subspace) costs direction, not distance
    sideways = source + perp + 0.5 * perp.norm(dim=1, keepdim=True) * basis[:, 0]
    loss = obj(sdk.Views(embeddings=(sideways,), extras={keys.TEACHER: (source,)}))
    assert loss.logs["direction"] > 0.05 and loss.logs["distance"] < 1e-20


def test_descent_from_the_source_reaches_the_orthogonal_projection():
    refs = _refs(shots=(3,))
    obj = sdk.create("objective", "directional_subspace_loss", references=refs)
    source = torch.randn(1, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    origin, basis = subspace_basis(refs[0])
    target = project(source, origin[None], basis[None])[0]
    free = (source + 1e-3 * torch.randn(1, 8, generator=torch.Generator().manual_seed(5),
                                        dtype=torch.float64)).requires_grad_()
    opt = torch.optim.LBFGS([free], lr=0.5, max_iter=400, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = obj(sdk.Views(embeddings=(free,), extras={keys.TEACHER: (source,)})).value
        loss.backward()
        return loss

    opt.step(closure)
    assert (free.detach() - target).abs().max() < 1e-4
    assert (target - source).norm() > 1.0  # a real move, not the starting point


def test_bad_input_is_named():
    refs = _refs()
    obj = sdk.create("objective", "directional_subspace_loss", references=refs)
    e = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(sdk.ShapeError, match=r"directional_subspace_loss.*embeddings\[0\] must be \[B, 8\]"):
        obj(sdk.Views(embeddings=(e[:, :5],), extras={keys.TEACHER: (e[:, :5],)}))
    with pytest.raises(sdk.ShapeError, match=r"extras\['teacher'\]\[0\].*\[3, 8\].*\[2, 8\]"):
        obj(sdk.Views(embeddings=(e,), extras={keys.TEACHER: (e[:2],)}))
    with pytest.raises(sdk.RequirementError, match="teacher"):
        obj(sdk.Views(embeddings=(e,)))
    with pytest.raises(sdk.ConfigError, match="references must be one floating"):
        sdk.create("objective", "directional_subspace_loss", references=[refs[0], refs[1][:, :4]])
    with pytest.raises(sdk.ConfigError, match="references"):
        sdk.create("objective", "directional_subspace_loss", references=torch.arange(8))
    with pytest.raises(sdk.ConfigError, match="3 weights for 2 target domains"):
        sdk.create("objective", "directional_subspace_loss", references=refs, weights=(1.0, 1.0, 1.0))
    with pytest.raises(sdk.ConfigError, match="weights"):
        sdk.create("objective", "directional_subspace_loss", references=refs, weights=(1.0, -1.0))
    with pytest.raises(sdk.ConfigError, match="direction_weight"):
        sdk.create("objective", "directional_subspace_loss", direction_weight=-1.0)
    nan = e.clone()
    nan[0, 0] = math.nan
    assert not torch.isfinite(obj(sdk.Views(embeddings=(nan,), extras={keys.TEACHER: (e + 1,)})).value)
