"""part_whole_composability (Adam-v2): both terms against a plain loop over the authors' heads
(value and gradient), the analytic value of a perfect decomposition (the decomposer's output is
normalised as one vector), no gradient into the teacher, the weights and the defaults."""

import math

import pytest
import torch

import sdk
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "part_whole_composability", **{"dim": 5, "n_parts": 3, **kw}).double()


def _inputs(b=4, d=5, n=3, seed=0):
    g = _g(seed)
    s = tuple(torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(1 + n))
    t = tuple(torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(1 + n))
    return sdk.Views(embeddings=s, extras={keys.TEACHER: t}), s, t


def _unit(v):
    return v / sum(x ** 2 for x in v).sqrt()


def _head(seq, x):
    """The authors' two-layer head written out: W2 relu(W1 x + b1) + b2."""
    first, last = seq[0], seq[2]
    h = torch.stack([max(first.weight[r] @ x + first.bias[r], x.new_zeros(())) for r in range(first.out_features)])
    return last.weight @ h + last.bias


def _slow(obj, s, t, wc=1.0, wd=1.0):
    """Per sample: compose the concatenated parts, compare with the teacher's whole; decompose
    the whole, normalise the n*D vector, compare each D-chunk with its teacher part."""
    n, d = obj.n_parts, obj.dim
    total = 0.0
    for i in range(s[0].shape[0]):
        parts = torch.cat([s[k][i] for k in range(1, n + 1)])
        c = _unit(_head(obj.composer, parts))
        tw = _unit(t[0][i].detach())
        lc = sum((c[j] - tw[j]) ** 2 for j in range(d)) / d
        u = _unit(_head(obj.decomposer, s[0][i]))
        ld = 0.0
        for k in range(n):
            tp = _unit(t[1 + k][i].detach())
            ld = ld + sum((u[k * d + j] - tp[j]) ** 2 for j in range(d)) / d
        total = total + wc * lc + wd * ld / n
    return total / s[0].shape[0]


def test_loss_equals_the_loop_value_and_gradient():
    obj = _obj(composability_weight=0.7, decomposability_weight=1.3)
    views, s, t = _inputs()
    loss = obj(views, sdk.Batch())
    slow = _slow(obj, s, t, 0.7, 1.3)
    torch.testing.assert_close(loss.value, slow, rtol=1e-10, atol=1e-12)
    params = [*s, *obj.parameters()]
    for a, b in zip(torch.autograd.grad(loss.value, params, retain_graph=True),
                    torch.autograd.grad(slow, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert torch.autograd.grad(loss.value, t, allow_unused=True) == (None,) * len(t)


def test_each_weight_scales_its_own_term():
    views, _, _ = _inputs(seed=3)
    logs = _obj()(views, sdk.Batch()).logs
    c = _obj(decomposability_weight=0.0)(views, sdk.Batch()).value
    d = _obj(composability_weight=0.0)(views, sdk.Batch()).value
    torch.testing.assert_close(c, logs["composability"])
    torch.testing.assert_close(d, logs["decomposability"])


def test_a_perfect_composer_gives_zero_and_a_perfect_decomposer_the_joint_normalisation_gap():
    """With heads that output exactly the teacher's whole and parts, L_c = 0, and L_d = (1 -
    1/sqrt(n))^2 / D: the decomposed vector is normalised as a whole (chunks of norm 1/sqrt(n))."""
    obj = _obj()
    n, d = 3, 5
    views, s, t = _inputs(b=1)
    tp = torch.cat([p.detach() / p.detach().norm(dim=1, keepdim=True) for p in t[1:]], 1)
    with torch.no_grad():
        for head, out in ((obj.composer, t[0].detach()[0]), (obj.decomposer, tp[0])):
            head[2].weight.zero_()
            head[2].bias.copy_(out)
    logs = obj(views, sdk.Batch()).logs
    assert float(logs["composability"]) < 1e-14
    torch.testing.assert_close(logs["decomposability"],
                               torch.tensor((1 - 1 / math.sqrt(n)) ** 2 / d, dtype=torch.float64))


def test_the_teacher_is_scale_invariant_and_per_sample_is_independent():
    obj = _obj()
    views, s, t = _inputs()
    base = obj(views, sdk.Batch())
    scaled = sdk.Views(embeddings=s, extras={keys.TEACHER: tuple(3.0 * x for x in t)})
    torch.testing.assert_close(obj(scaled, sdk.Batch()).per_sample, base.per_sample)
    first = sdk.Views(embeddings=tuple(x[:1] for x in s), extras={keys.TEACHER: tuple(x[:1] for x in t)})
    torch.testing.assert_close(obj(first, sdk.Batch()).per_sample, base.per_sample[:1])


def test_defaults_are_the_authors_and_errors_name_the_plugin():
    obj = sdk.create("objective", "part_whole_composability")
    assert (obj.n_parts, obj.composability_weight, obj.decomposability_weight) == (4, 1.0, 1.0)
    assert obj.composer[0].in_features == 4 * obj.dim and obj.decomposer[2].out_features == 4 * obj.dim
    assert obj.batch_coupled is False
    small = _obj()
    views, s, t = _inputs()
    with pytest.raises(sdk.ShapeError, match="part_whole_composability.*4 views, got 3"):
        small(sdk.Views(embeddings=s[:3], extras={keys.TEACHER: t[:3]}), sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="part_whole_composability.*dim=5"):
        small(sdk.Views(embeddings=tuple(x[:, :4] for x in s),
                        extras={keys.TEACHER: tuple(x[:, :4] for x in t)}), sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="part_whole_composability.*teacher"):
        small(sdk.Views(embeddings=s, extras={keys.TEACHER: t[:2]}), sdk.Batch())
    with pytest.raises(sdk.RequirementError, match="part_whole_composability.*teacher"):
        small(sdk.Views(embeddings=s), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="part_whole_composability: n_parts must be >= 1"):
        sdk.create("objective", "part_whole_composability", n_parts=0)
