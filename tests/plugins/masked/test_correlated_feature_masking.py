"""correlated_feature_masking: the masked set against a slow greedy loop on a known mutual
information matrix, the complementary second view, the mutual information against scikit-learn's
``mutual_info_score``, uniform seeds, and clear errors."""

import pytest
import torch
from sklearn.metrics import mutual_info_score

import sdk
from plugins.masked.correlated_feature_masking import correlated_mask, discretize, mutual_information
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow_set(mi, seed, n):
    """The seed, then the most informative features about it one at a time."""
    chosen = [seed]
    while len(chosen) < n:
        best = max((j for j in range(mi.shape[0]) if j not in chosen), key=lambda j: (float(mi[seed, j]), -j))
        chosen.append(best)
    return set(chosen)


def test_mask_is_the_seed_and_its_most_informative_features():
    a = torch.rand(10, 10, generator=_g())
    mi = a + a.T
    seeds = torch.arange(10)
    mask = correlated_mask(mi, seeds, 5)
    for s in range(10):
        assert set(torch.nonzero(mask[s]).flatten().tolist()) == _slow_set(mi, s, 5)


def test_two_views_are_complementary_and_follow_the_given_mutual_information():
    a = torch.rand(8, 8, generator=_g(1))
    mi = (a + a.T).tolist()
    first = sdk.create("transform", "correlated_feature_masking", num_features=8, mutual_information=mi,
                       fill=-1.0)
    second = sdk.create("transform", "correlated_feature_masking", num_features=8, complement=True,
                        fill=-1.0)
    x = torch.rand(200, 8, generator=_g(2))
    torch.manual_seed(0)
    x1, batch = first(x, sdk.Batch(index=torch.arange(200)))
    x2, _ = second(x, batch)
    m = batch.extras[keys.MASK]
    assert torch.equal(m.sum(1), torch.full((200,), 4.0))  # half of the features
    assert torch.equal(x1 == -1, m.bool()) and torch.equal(x2 == -1, ~m.bool())
    assert torch.equal(torch.where(m.bool(), x2, x1), x)  # together they show every value once
    mt = torch.tensor(mi)
    sets = {frozenset(torch.nonzero(row).flatten().tolist()) for row in m}
    allowed = {frozenset(_slow_set(mt, s, 4)) for s in range(8)}
    assert sets <= allowed and len(sets) == len(allowed)  # every seed drawn, each its greedy set


def test_mutual_information_equals_scikit_learns():
    g = _g(3)
    a = torch.randint(0, 3, (500,), generator=g)
    b = (a + torch.randint(0, 2, (500,), generator=g)) % 3  # depends on a
    c = torch.randint(0, 3, (500,), generator=g)  # independent
    codes = torch.stack([a, b, c], 1)
    mi = mutual_information(codes, 3)
    for i in range(3):
        for j in range(3):
            ref = mutual_info_score(codes[:, i].numpy(), codes[:, j].numpy())
            assert abs(float(mi[i, j]) - ref) < 1e-5, (i, j)
    assert mi[0, 1] > 10 * mi[0, 2]
    x = torch.randn(400, 2, generator=g)
    q, n = discretize(x, 4)
    assert n == 4 and torch.equal(torch.bincount(q[:, 0], minlength=4), torch.full((4,), 100))


def test_from_the_dataset_digits_neighbouring_pixels_are_masked_together():
    split = sdk.data.load("digits").train
    tf = sdk.create("transform", "correlated_feature_masking", dataset=split)
    assert tf.mi.shape == (64, 64) and tf.n_mask == 32  # the defaults: 64 pixels, half masked
    # the pixel most informative about a central pixel is one of its 8 neighbours
    centre = 3 * 8 + 3
    row = tf.mi[centre].clone()
    row[centre] = -1
    best = int(row.argmax())
    assert abs(best // 8 - 3) <= 1 and abs(best % 8 - 3) <= 1, best


def test_defaults_and_errors_name_the_plugin():
    tf = sdk.create("transform", "correlated_feature_masking")
    assert tf.mask_ratio == 0.5 and tf.complement is False and tf.fill == 0.0
    x, batch = tf(torch.rand(6, 64), sdk.Batch())  # no matrix given: estimated on the batch
    assert torch.equal(batch.extras[keys.MASK].sum(1), torch.full((6,), 32.0))
    with pytest.raises(sdk.ShapeError, match="'correlated_feature_masking': x must be floating with 64"):
        tf(torch.rand(6, 10), sdk.Batch())
    comp = sdk.create("transform", "correlated_feature_masking", complement=True)
    with pytest.raises(sdk.RequirementError, match="'correlated_feature_masking'.*needs Batch.extras\\['mask'\\]"):
        comp(torch.rand(6, 64), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="correlated_feature_masking: mutual_information must be \\[64, 64\\]"):
        sdk.create("transform", "correlated_feature_masking", mutual_information=[[0.0]])
    with pytest.raises(sdk.ConfigError, match="the complement view takes the first view's mask"):
        sdk.create("transform", "correlated_feature_masking", complement=True,
                   mutual_information=torch.zeros(64, 64).tolist())
    with pytest.raises(sdk.ConfigError, match="mask_ratio must be"):
        sdk.create("transform", "correlated_feature_masking", mask_ratio=1.0)
