"""boosting_margin_transfer against written-out loops of the authors' BirankLoss, BoostabsLoss
and BoostrelLoss (value and gradient); the rel variant's adaptive margin is the anchor's gap;
with an anchor that separates nothing it is the fixed-margin triplet loss."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def sim(v, t):
    n = len(v)
    return torch.stack([torch.stack([cos(v[i], t[j]) for j in range(n)]) for i in range(n)])


def slow(v, t, va, ta, margin=0.2, gamma=0.5, alpha=1.0, boost="abs", beta=1.0):
    s, sa = sim(v, t), sim(va, ta)
    mb = margin * beta  # the boosting losses' margin
    n = len(v)
    rows = []
    for i in range(n):
        hinge = max(torch.clamp(margin + s[i, j] - s[i, i], min=0) for j in range(n) if j != i) \
            + max(torch.clamp(margin + s[j, i] - s[i, i], min=0) for j in range(n) if j != i)
        if boost == "abs":
            extra = 2 * torch.clamp(mb * gamma + sa[i, i] - s[i, i], min=0) \
                + max(torch.clamp(mb * (1 - gamma) + s[i, j] - sa[i, j], min=0) for j in range(n) if j != i) \
                + max(torch.clamp(mb * (1 - gamma) + s[j, i] - sa[j, i], min=0) for j in range(n) if j != i)
        else:  # the margin on the target's gap is m + the anchor's gap
            extra = max(torch.clamp((mb + sa[i, i] - sa[i, j]) - (s[i, i] - s[i, j]), min=0)
                        for j in range(n) if j != i) \
                + max(torch.clamp((mb + sa[i, i] - sa[j, i]) - (s[i, i] - s[j, i]), min=0)
                      for j in range(n) if j != i)
        rows.append(hinge + alpha * extra)
    return torch.stack(rows)


def loss_of(v, t, teacher=None, **kw):
    extras = {} if teacher is None else {"teacher": teacher}
    return sdk.create("objective", "boosting_margin_transfer", **kw)(
        sdk.Views(embeddings=(v, t), extras=extras), sdk.Batch())


@pytest.mark.parametrize("boost", ["abs", "rel"])
def test_matches_loop_value_and_gradient(boost):
    g = torch.Generator().manual_seed(0)
    v, t, va, ta = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(4))
    v.requires_grad_()
    t.requires_grad_()
    got = loss_of(v, t, (va, ta), boost=boost, gamma=0.3, alpha=0.7, beta=1.5).per_sample
    want = slow(v, t, va, ta, gamma=0.3, alpha=0.7, boost=boost, beta=1.5)
    assert torch.allclose(got, want, rtol=1e-12)
    got_g = torch.autograd.grad(got.sum(), (v, t))
    want_g = torch.autograd.grad(want.sum(), (v, t))
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_rel_with_an_uninformative_anchor_is_the_fixed_margin_triplet_loss():
    g = torch.Generator().manual_seed(1)
    v, t = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    same = torch.ones(5, 3, dtype=torch.float64)  # every anchor score equal: gaps 0
    with_anchor = loss_of(v, t, (same, same), boost="rel", alpha=1.0).per_sample
    plain = loss_of(v, t, alpha=0.0).per_sample  # the anchor branch's own loss: birank only
    assert torch.allclose(with_anchor, 2 * plain, rtol=1e-12)  # rel with gap 0 is birank again
    # birank itself: VSE++'s hinge with the hardest negatives, against its definition
    s = F.normalize(v, dim=1) @ F.normalize(t, dim=1).T
    eye = torch.eye(5, dtype=torch.bool)
    want = ((0.2 + s - s.diag()[:, None]).clamp_min(0).masked_fill(eye, 0).max(1).values
            + (0.2 + s - s.diag()[None, :]).clamp_min(0).masked_fill(eye, 0).max(0).values)
    assert torch.allclose(plain, want, rtol=1e-12)


def test_beating_the_anchor_by_the_margins_zeroes_the_boost_term():
    # target = anchor with positives raised by >= m gamma and negatives lowered by >= m (1 - gamma)
    e, ones = torch.eye(4, dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64)
    anchor = (e + 0.3 * ones, e + 2 * ones)  # positive cosines 0.888, negative ones 0.733
    loss = loss_of(e, e, anchor, boost="abs", margin=0.2)  # target: positives 1, negatives 0
    assert loss.logs["boost_loss"].item() == 0.0
    behind = loss_of(*anchor, (e, e), boost="abs", margin=0.2)
    assert behind.logs["boost_loss"].item() > 0.1


def test_errors():
    v = torch.randn(3, 2)
    with pytest.raises(sdk.RequirementError, match="needs the anchor branch's embeddings"):
        loss_of(v, v)
    with pytest.raises(sdk.ShapeError, match=r"boosting_margin_transfer: extras\['teacher'\]"):
        loss_of(v, v, (v,))
    with pytest.raises(sdk.ConfigError, match="boost"):
        sdk.create("objective", "boosting_margin_transfer", boost="dino")


def test_defaults_are_the_authors_code():
    # m = 0.2, beta = 1, gamma = 0.5, alpha = 1, BoostabsLoss (DBL's opts.py / loss.py)
    g = torch.Generator().manual_seed(5)
    v, t, va, ta = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(4))
    got = loss_of(v, t, (va, ta)).per_sample
    assert torch.allclose(got, slow(v, t, va, ta, margin=0.2, gamma=0.5, alpha=1.0, boost="abs",
                                    beta=1.0), rtol=1e-12)
    assert not torch.allclose(got, slow(v, t, va, ta, boost="rel"))
