"""core_tuning against loops of the focal supervised contrastive loss and the mixup pairs."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.core_tuning import core_tuning_loss, focal_supcon, hard_pair_indices


def slow_focal_supcon(z, labels, t):
    """Anchor by anchor: -1/|P| sum_p (1 - p_ip) log p_ip; mean over anchors with positives."""
    z = F.normalize(z, dim=1)
    n, total, count = len(z), 0.0, 0
    for i in range(n):
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        pos = [j for j in range(n) if j != i and torch.equal(labels[j], labels[i])]
        if not pos:
            continue
        terms = []
        for j in pos:
            p = math.exp(float(z[i] @ z[j]) / t) / den
            terms.append((1 - p) * math.log(p))
        total += -sum(terms) / len(terms)
        count += 1
    return total / count


def data(seed, b=8, d=5, c=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randn(b, c, generator=g, dtype=torch.float64),
            torch.randint(0, c, (b,), generator=g))


def test_focal_term_matches_loop():
    z, _, y = data(0)
    loss, valid = focal_supcon(z, y, 0.5)
    got = (loss * valid).sum() / valid.sum()
    assert got.item() == pytest.approx(slow_focal_supcon(z, y, 0.5), rel=1e-5)


def test_focal_term_gradient_matches_finite_differences():
    z, _, y = data(1, b=6, d=3)
    z.requires_grad_()
    torch.autograd.gradcheck(lambda x: focal_supcon(x, y, 0.5)[0].sum().double(), (z,), eps=1e-3,
                             atol=2e-3, rtol=1e-2)


def test_focal_weights_down_weight_easy_positives():
    z, _, y = data(2)
    focal, valid = focal_supcon(z, y, 1.0)
    zn = F.normalize(z.float(), dim=1)
    logits = zn @ zn.T / 1.0
    eye = torch.eye(8, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, -1e9), 1, keepdim=True)
    pos = (y[:, None] == y[None]) & ~eye
    supcon = -(log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)
    assert (focal[valid] < supcon[valid]).all()  # (1 - p) < 1 scales every term down


def test_eta_zero_without_mixup_is_cross_entropy():
    z, logits, y = data(3)
    obj = sdk.create("objective", "core_tuning", eta=0.0, mixup=False)
    loss = obj(sdk.Views(embeddings=(z.float(),), logits=logits.float()), sdk.Batch(targets=y))
    assert torch.allclose(loss.value, F.cross_entropy(logits.float(), y))
    assert torch.allclose(loss.per_sample, F.cross_entropy(logits.float(), y, reduction="none"))


def test_without_mixup_is_ce_plus_eta_focal():
    z, logits, y = data(4)
    obj = sdk.create("objective", "core_tuning", eta=2.0, temperature=0.3, mixup=False)
    loss = obj(sdk.Views(embeddings=(z.float(),), logits=logits.float()), sdk.Batch(targets=y))
    expected = F.cross_entropy(logits, y).item() + 2.0 * slow_focal_supcon(z, y, 0.3)
    assert loss.value.item() == pytest.approx(expected, rel=1e-5)


def test_hard_pairs_are_least_similar_positive_and_most_similar_negative():
    z, _, y = data(5, b=10)
    pos, neg = hard_pair_indices(z, y)
    zn = F.normalize(z, dim=1)
    for i in range(10):
        same = [j for j in range(10) if j != i and y[j] == y[i]]
        other = [j for j in range(10) if y[j] != y[i]]
        assert pos[i] == (min(same, key=lambda j: float(zn[i] @ zn[j])) if same else i)
        assert neg[i] == (max(other, key=lambda j: float(zn[i] @ zn[j])) if other else i)


def slow_core_tuning(z, logits, y, order, ln, lp, eta, t):
    """CE + eta * focal term over the batch, its hard negatives (1-l) x_i + l x_order(i) with the
    given l = ln[i], and its hard pairs lp[i] x_hp(i) + (1-lp[i]) x_hn(i), row by row."""
    b = len(z)
    pos, neg = hard_pair_indices(z, y)
    oh = F.one_hot(y, logits.shape[1]).double()
    rows = [(z[i], logits[i], oh[i]) for i in range(b)]
    rows += [((1 - ln[i]) * z[i] + ln[i] * z[order[i]], (1 - ln[i]) * logits[i] + ln[i] * logits[order[i]],
              (1 - ln[i]) * oh[i] + ln[i] * oh[order[i]]) for i in range(b)]
    rows += [(lp[i] * z[pos[i]] + (1 - lp[i]) * z[neg[i]], lp[i] * logits[pos[i]] + (1 - lp[i]) * logits[neg[i]],
              lp[i] * oh[pos[i]] + (1 - lp[i]) * oh[neg[i]]) for i in range(b)]
    ce = sum(-float((yy * F.log_softmax(ll, 0)).sum()) for _, ll, yy in rows) / len(rows)
    zz = torch.stack([r[0] for r in rows])
    labels = torch.stack([r[2] for r in rows])
    return ce + eta * slow_focal_supcon(zz, labels, t)


def test_mixup_generated_pairs_match_loop():
    z, logits, y = data(6)
    order = torch.tensor([3, 0, 7, 1, 2, 6, 4, 5])
    ln = torch.full((8,), 0.85, dtype=torch.float64)
    lp = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    value, per_sample, _ = core_tuning_loss(z, logits, y, eta=1.5, temperature=0.4, order=order,
                                            lam_negative=ln, lam_positive=lp)
    expected = slow_core_tuning(z, logits, y, order, ln, lp, 1.5, 0.4)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert per_sample.shape == (8,)


@pytest.mark.parametrize("min_lambda", [None, 0.55])
def test_hard_negative_weight_is_raised_to_min_lambda(min_lambda):
    """The objective draws l ~ Beta(a, a) per sample and mixes its hard negatives with
    max(l, min_lambda) (the reference: ``if lam[i] <= 0.8: lam[i] = 0.8``; 0.8 by default),
    while the hard pairs keep their raw draw. Replays the objective's draws and checks the
    loss against the row-by-row loop with the bound applied; the draws fall on both sides of
    the bound, so neither the raw draws nor min(l, min_lambda) give this loss."""
    bound = 0.8 if min_lambda is None else min_lambda
    params = {} if min_lambda is None else {"min_lambda": min_lambda}
    z, logits, y = data(8, b=12)
    obj = sdk.create("objective", "core_tuning", eta=1.5, temperature=0.4, **params)
    torch.manual_seed(11)
    got = obj(sdk.Views(embeddings=(z,), logits=logits), sdk.Batch(targets=y)).value
    torch.manual_seed(11)
    order = torch.randperm(12)
    beta = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0))
    drawn, lp = beta.sample((12,)).double(), beta.sample((12,)).double()
    assert (drawn < bound).any() and (drawn > bound).any()
    raised = [max(float(v), bound) for v in drawn]
    assert got.item() == pytest.approx(slow_core_tuning(z, logits, y, order, raised, lp, 1.5, 0.4), rel=1e-5)
    for wrong in ([float(v) for v in drawn], [min(float(v), bound) for v in drawn]):
        assert abs(slow_core_tuning(z, logits, y, order, wrong, lp, 1.5, 0.4) - got.item()) > 1e-4


def test_mixup_only_in_training():
    z, logits, y = data(7)
    obj = sdk.create("objective", "core_tuning", eta=0.0)
    views, batch = sdk.Views(embeddings=(z.float(),), logits=logits.float()), sdk.Batch(targets=y)
    torch.manual_seed(0)
    train = obj(views, batch).value
    obj.eval()
    assert torch.allclose(obj(views, batch).value, F.cross_entropy(logits.float(), y))
    assert not torch.allclose(train, F.cross_entropy(logits.float(), y))


def test_bad_inputs_and_parameters():
    obj = sdk.create("objective", "core_tuning")
    with pytest.raises(sdk.RequirementError, match="logits"):
        obj(sdk.Views(embeddings=(torch.randn(4, 3),)), sdk.Batch(targets=torch.arange(4)))
    with pytest.raises(sdk.RequirementError, match="targets"):
        obj(sdk.Views(embeddings=(torch.randn(4, 3),), logits=torch.randn(4, 2)))
    with pytest.raises(sdk.ShapeError, match="targets"):
        obj(sdk.Views(embeddings=(torch.randn(4, 3),), logits=torch.randn(4, 2)),
            sdk.Batch(targets=torch.rand(4, 2)))
    for param, value in [("eta", -1.0), ("temperature", 0.0), ("mixup_alpha", 0.0), ("min_lambda", 1.5)]:
        with pytest.raises(sdk.ConfigError, match=param):
            sdk.create("objective", "core_tuning", **{param: value})
