"""relative_representation: cosine to anchors (Moschella et al. 2023), its invariances and
zero-shot stitching on digits."""

import math

import pytest
import torch
from torch import nn

import sdk
from plugins.encoders.relative_representation import relative_projection


def _slow(z, a, center):
    z, a = z.double(), a.double()
    if center:
        mean = sum(a) / len(a)
        z, a = z - mean, a - mean
    return torch.tensor([[float(zi @ aj) / math.sqrt(float(zi @ zi) * float(aj @ aj)) for aj in a]
                         for zi in z], dtype=torch.float64)


@pytest.mark.parametrize("center", [False, True])
def test_projection_equals_the_slow_cosines(center):
    g = torch.Generator().manual_seed(0)
    z, a = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g,
                                                                            dtype=torch.float64)
    torch.testing.assert_close(relative_projection(z, a, center), _slow(z, a, center))


def _rotated(backbone, scale, shift=None, seed=1):
    """``e'(x) = scale · Q e(x) (+ shift)`` for a random orthogonal ``Q``."""
    d = backbone[-1].out_features
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    lin = nn.Linear(d, d, bias=shift is not None)
    with torch.no_grad():
        lin.weight.copy_(scale * q)
        if shift is not None:
            lin.bias.copy_(shift)
    return nn.Sequential(backbone, lin)


def test_invariant_to_rotation_and_rescaling_of_the_latent_space_and_not_to_translation():
    torch.manual_seed(0)
    x, anchors = torch.randn(16, 10), torch.randn(12, 10)
    rel = sdk.create("encoder", "relative_representation", in_dim=10, anchors=anchors)
    assert rel.out_dim == 12 and rel.center is False  # default: no centering
    rotated = sdk.create("encoder", "relative_representation",
                         backbone=_rotated(rel.backbone, 3.7), anchors=anchors)
    torch.testing.assert_close(rotated(x), rel(x), atol=1e-6, rtol=0)
    assert not torch.allclose(rotated.absolute(x), rel.absolute(x), atol=0.1)
    shift = 5 * torch.ones(rel.backbone[-1].out_features)
    moved = sdk.create("encoder", "relative_representation",
                       backbone=_rotated(rel.backbone, 0.5, shift), anchors=anchors)
    assert (moved(x) - rel(x)).abs().max() > 0.1  # a translation changes uncentred cosines
    centred = sdk.create("encoder", "relative_representation", backbone=rel.backbone,
                         anchors=anchors, center=True)
    moved_c = sdk.create("encoder", "relative_representation",
                         backbone=_rotated(rel.backbone, 0.5, shift), anchors=anchors, center=True)
    torch.testing.assert_close(moved_c(x), centred(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(centred(x), relative_projection(
        rel.absolute(x), rel.absolute(anchors), center=True).float())


def test_anchors_from_the_dataset_and_defaults():
    data = torch.randn(100, 6)
    rel = sdk.create("encoder", "relative_representation", dataset=data, in_dim=6)
    assert rel.out_dim == 64  # num_anchors default
    rows = [(data == a).all(1).nonzero().item() for a in rel.anchors]
    assert len(set(rows)) == 64
    again = sdk.create("encoder", "relative_representation", dataset=data, in_dim=6)
    assert torch.equal(again.anchors, rel.anchors)  # seed 0
    other = sdk.create("encoder", "relative_representation", dataset=data, in_dim=6, seed=1)
    assert not torch.equal(other.anchors, rel.anchors)
    # the anchors' embeddings follow the backbone: gradients reach it through both sides
    rel(torch.randn(3, 6)).sum().backward()
    assert all(p.grad is not None for p in rel.backbone.parameters())


def test_bad_input_is_named():
    rel = sdk.create("encoder", "relative_representation", in_dim=6, anchors=torch.randn(5, 6))
    with pytest.raises(sdk.ShapeError, match=r"relative_representation': x must be floating \[B, 6\]"):
        rel(torch.randn(3, 7))
    with pytest.raises(sdk.ConfigError, match="fewer than num_anchors=64"):
        sdk.create("encoder", "relative_representation", dataset=torch.randn(10, 6), in_dim=6)
    with pytest.raises(sdk.ConfigError, match="anchors must be floating"):
        sdk.create("encoder", "relative_representation", anchors=torch.arange(6))
    with pytest.raises(sdk.ConfigError, match="num_anchors"):
        sdk.create("encoder", "relative_representation", num_anchors=0)
    metric = sdk.create("metric", "relative_representation")
    with pytest.raises(sdk.ShapeError, match="metric 'relative_representation'"):
        metric.update(torch.randn(4, 3), torch.randn(4, 2))


def test_metric_cosine_and_jaccard_equal_slow_values():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    metric = sdk.create("metric", "relative_representation", k=3)
    metric.update(a[:7], b[:7])
    metric.update(a[7:], b[7:])
    out = metric.compute()
    cos = sum(float(x @ y) / float(x.norm() * y.norm()) for x, y in zip(a, b)) / 12

    def knn(r, i):
        s = [(float(r[i] @ r[j]) / float(r[i].norm() * r[j].norm()), j) for j in range(12) if j != i]
        return {j for _, j in sorted(s, reverse=True)[:3]}

    jac = sum(len(knn(a, i) & knn(b, i)) / len(knn(a, i) | knn(b, i)) for i in range(12)) / 12
    assert out["cosine"] == pytest.approx(cos, abs=1e-6)
    assert out["jaccard"] == pytest.approx(jac, abs=1e-9)
    same = sdk.create("metric", "relative_representation")
    same.update(a, 2 * a)
    assert same.compute() == pytest.approx({"cosine": 1.0, "jaccard": 1.0})


def _trained_mlp(x, y, seed):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    head = nn.Linear(16, 10)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(head(body(x)), y).backward()
        opt.step()
    return body


def test_zero_shot_stitching_on_digits():
    """The paper's claim: a head fitted on encoder A's relative space works on encoder B's
    (another seed) without training; on absolute embeddings it does not. On digits the claim
    holds within 5 points with centring and 500 anchors only."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    enc_a, enc_b = _trained_mlp(x[tr], y[tr], 0), _trained_mlp(x[tr], y[tr], 1)
    # centred, 500 anchors: 3.5 points lost (64 anchors: 5.9; uncentred: 13)
    rel_a, rel_b = (sdk.create("encoder", "relative_representation", backbone=enc, dataset=x[tr],
                               num_anchors=500, center=True) for enc in (enc_a, enc_b))
    with torch.no_grad():
        ra_tr, ra_te, rb_te = rel_a(x[tr]), rel_a(x[te]), rel_b(x[te])
        za_tr, za_te, zb_te = enc_a(x[tr]), enc_a(x[te]), enc_b(x[te])
    rel_head = LogisticRegression(max_iter=2000).fit(ra_tr.numpy(), y[tr].numpy())
    abs_head = LogisticRegression(max_iter=2000).fit(za_tr.numpy(), y[tr].numpy())
    own = rel_head.score(ra_te.numpy(), y[te].numpy())
    stitched = rel_head.score(rb_te.numpy(), y[te].numpy())
    abs_stitched = abs_head.score(zb_te.numpy(), y[te].numpy())
    assert abs_head.score(za_te.numpy(), y[te].numpy()) > 0.9
    assert own > 0.9 and stitched > own - 0.05, (own, stitched)
    assert abs_stitched < 0.3, abs_stitched
    metric = sdk.create("metric", "relative_representation")
    metric.update(ra_te, rb_te)
    across = metric.compute()
    absolute = sdk.create("metric", "relative_representation")
    absolute.update(za_te, zb_te)
    # the cosine across spaces is high in relative coordinates, near 0 in absolute ones (kNN
    # sets by cosine are rotation invariant in both, so the Jaccard overlap is not compared)
    assert across["cosine"] > 0.9 and abs(absolute.compute()["cosine"]) < 0.3
    print(f"digits stitching: own {own:.3f}, relative stitched {stitched:.3f}, absolute "
          f"stitched {abs_stitched:.3f}, metric {across}")
