"""tri_training_neighbor_positives: masks against explicit loops, nt_xent against a SupCon loop,
agreement precision on digits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestNeighbors

import sdk
from plugins.contrastive.tri_training_neighbor_positives import neighbor_agreement_mask


def _cos(z, i, j):
    return float(z[i] @ z[j]) / (float(z[i].norm()) * float(z[j].norm()))


def slow_knn(z, i, k):
    others = [j for j in range(len(z)) if j != i]
    return set(sorted(others, key=lambda j: -_cos(z, i, j))[:k])


def slow_mask(spaces, k, agreement, min_agree=None, t=1.0):
    b = len(spaces[0])
    out = np.zeros((b, b), dtype=bool)
    for i in range(b):
        if agreement == "vote":
            need = len(spaces) if min_agree is None else min_agree
            for j in range(b):
                out[i, j] = sum(j in slow_knn(z, i, k) for z in spaces) >= need
        else:
            score = {j: 0.0 for j in range(b) if j != i}
            for z in spaces:
                e = {j: math.exp(_cos(z, i, j) / t) for j in score}
                total = sum(e.values())
                for j in score:
                    score[j] += e[j] / total
            for j in sorted(score, key=lambda j: -score[j])[:k]:
                out[i, j] = True
    return torch.from_numpy(out)


def _spaces(n, b=12, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("agreement,min_agree", [("sum", None), ("vote", None), ("vote", 2), ("vote", 1)])
def test_mask_matches_loop(agreement, min_agree):
    spaces = _spaces(3)
    kw = {} if min_agree is None else {"min_agree": min_agree}
    got = neighbor_agreement_mask(spaces, 4, agreement=agreement, **kw)
    assert torch.equal(got, slow_mask(spaces, 4, agreement, min_agree))
    assert not got.diagonal().any()


def test_sum_temperature_matches_loop():
    spaces = _spaces(2, seed=3)
    got = neighbor_agreement_mask(spaces, 3, agreement="sum", temperature=0.1)
    assert torch.equal(got, slow_mask(spaces, 3, "sum", t=0.1))


@pytest.mark.parametrize("agreement", ["sum", "vote"])
def test_one_space_is_plain_knn(agreement):
    (z,) = _spaces(1, b=15, seed=4)
    got = neighbor_agreement_mask([z], 5, agreement=agreement)
    nn_idx = NearestNeighbors(n_neighbors=6, metric="cosine").fit(z.numpy()).kneighbors(
        return_distance=False)[:, :5]
    expected = torch.zeros(15, 15, dtype=torch.bool)
    expected[torch.arange(15)[:, None], torch.from_numpy(nn_idx)] = True
    assert torch.equal(got, expected)


def test_pairs_expand_over_views_and_leave_one_out():
    spaces = [s.float() for s in _spaces(3, b=10, seed=5)]
    views = sdk.Views(embeddings=tuple(spaces))
    sampler = sdk.create("sampler", "tri_training_neighbor_positives", k=3, leave_one_out=True)
    pairs = sampler.pairs(views, sdk.Batch())
    for v in range(3):
        others = [s.double() for w, s in enumerate(spaces) if w != v]
        nb = slow_mask(others, 3, "sum")
        for i in range(10):
            for w in range(3):
                for j in range(10):
                    expected = i == j or bool(nb[i, j])
                    assert bool(pairs.positive[v * 10 + i, w * 10 + j]) == expected
    assert torch.equal(pairs.negative, ~pairs.positive)


def slow_supcon(views, pos_sets, t):
    """SupCon L_out anchor by anchor; pos_sets[r]: positive rows of row r (r excluded)."""
    z = [F.normalize(r, dim=0) for v in views for r in v.double()]
    total = 0.0
    for i, zi in enumerate(z):
        den = sum(math.exp(float(zi @ zk) / t) for k, zk in enumerate(z) if k != i)
        total += -sum(float(zi @ z[p]) / t - math.log(den) for p in pos_sets[i]) / len(pos_sets[i])
    return total / len(z)


def test_nt_xent_with_sampler_equals_supcon_loop():
    g = torch.Generator().manual_seed(6)
    b, t = 9, 0.3
    views = [torch.randn(b, 4, generator=g, requires_grad=True) for _ in range(2)]
    heads = tuple(torch.randn(b, 6, generator=g) for _ in range(3))
    sampler = sdk.create("sampler", "tri_training_neighbor_positives", k=2, agreement="vote",
                         min_agree=2, source="heads")
    obj = sdk.create("objective", "nt_xent", temperature=t, sampler=sampler)
    loss = obj(sdk.Views(embeddings=tuple(views), extras={"heads": heads}), sdk.Batch()).value
    nb = slow_mask([h.double() for h in heads], 2, "vote", 2)
    pos_sets = [[w * b + j for w in range(2) for j in range(b)
                 if w * b + j != r and (j == r % b or bool(nb[r % b, j]))] for r in range(2 * b)]
    assert loss.item() == pytest.approx(slow_supcon([v.detach() for v in views], pos_sets, t), rel=1e-5)
    # gradient against the loop's autograd in float64
    loss.backward()
    z = [v.detach().double().requires_grad_(True) for v in views]
    zz = F.normalize(torch.cat(z), dim=1)
    sim = zz @ zz.T / t
    ref = 0.0
    for r in range(2 * b):
        den = torch.logsumexp(torch.cat([sim[r, :r], sim[r, r + 1:]]), 0)
        ref = ref + torch.stack([den - sim[r, p] for p in pos_sets[r]]).mean()
    (ref / (2 * b)).backward()
    for v, zr in zip(views, z):
        assert torch.allclose(v.grad.double(), zr.grad, atol=1e-5)


def test_agreement_raises_class_precision_on_digits():
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)[:400]
    x, y = torch.tensor(x, dtype=torch.float32)[idx], torch.tensor(y)[idx]
    spaces = [x * (torch.rand(x.shape, generator=g) > 0.3) for _ in range(2)]
    spaces.append(x @ torch.randn(64, 32, generator=g))

    def precision(mask):
        return (mask & (y[:, None] == y[None, :])).sum().item() / mask.sum().item()

    single = precision(neighbor_agreement_mask(spaces[:1], 10))
    agreed = precision(neighbor_agreement_mask(spaces, 10, agreement="vote"))
    summed = precision(neighbor_agreement_mask(spaces, 10))
    assert agreed > single + 0.02
    assert summed > single


@pytest.mark.parametrize("kwargs,param", [
    ({"k": 0}, "k"), ({"agreement": "mean"}, "agreement"), ({"min_agree": 2}, "min_agree"),
    ({"agreement": "vote", "min_agree": 0}, "min_agree"), ({"temperature": 0.0}, "temperature"),
    ({"agreement": "vote", "temperature": 0.5}, "temperature"),
])
def test_bad_parameters_name_the_field(kwargs, param):
    with pytest.raises(sdk.ConfigError, match=param):
        sdk.create("sampler", "tri_training_neighbor_positives", **kwargs)


def test_bad_inputs_raise():
    views = sdk.Views(embeddings=(torch.randn(6, 3), torch.randn(6, 3)))
    with pytest.raises(sdk.ConfigError, match="min_agree"):
        sdk.create("sampler", "tri_training_neighbor_positives", agreement="vote",
                   min_agree=3).pairs(views, sdk.Batch())
    with pytest.raises(sdk.RequirementError, match="heads"):
        sdk.create("sampler", "tri_training_neighbor_positives", source="heads").pairs(views, sdk.Batch())
    bad = views.evolve(extras={"heads": (torch.randn(5, 3),)})
    with pytest.raises(sdk.ShapeError, match="heads"):
        sdk.create("sampler", "tri_training_neighbor_positives", source="heads").pairs(bad, sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="leave_one_out"):
        sdk.create("sampler", "tri_training_neighbor_positives", leave_one_out=True,
                   source="heads").pairs(views.evolve(extras={"heads": (torch.randn(6, 3),) * 3}),
                                         sdk.Batch())
