"""clan_augmented_negatives (CLAN): the loss against a pair-by-pair loop (value and gradient),
augmented samples as negatives of benign anchors, the margin, the centroid score and its state."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.clan_augmented_negatives import CLANAugmentedNegatives, clan_loss


def slow_clan(z, augs, margin, alpha, squared, eps=1e-6):
    """alpha * mean of nonzero d(z_i, z_j)^p (i != j) + (1 - alpha) * mean of nonzero
    [margin - d(z_i, a_m)]_+^p, with d = (1 - cos) / 2, pair by pair in float64."""
    p = 2 if squared else 1

    def d(u, v):
        return (1 - F.cosine_similarity(u.double(), v.double(), dim=0)) / 2

    intra = [d(z[i], z[j]) ** p for i in range(len(z)) for j in range(len(z)) if i != j]
    hinge = [torch.clamp(margin - d(z[i], a[m]), min=0) ** p
             for i in range(len(z)) for a in augs for m in range(len(a))]
    mean = lambda xs: sum(xs) / max(1, sum(1 for x in xs if x > eps))  # noqa: E731
    return alpha * mean(intra) + (1 - alpha) * mean(hinge)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("n_aug", [1, 2])
def test_matches_pairwise_loop_value_and_gradient(squared, n_aug):
    g = torch.Generator().manual_seed(n_aug)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    augs = [torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_aug)]
    obj = CLANAugmentedNegatives(margin=0.45, alpha=0.3, squared=squared)
    loss = obj(sdk.Views(embeddings=(z.float(), *[a.float() for a in augs])))
    slow = slow_clan(z, augs, 0.45, 0.3, squared)
    assert loss.value.item() == pytest.approx(slow.item(), rel=1e-5)
    assert torch.allclose(loss.per_sample.mean(), loss.value)
    got = torch.autograd.grad(loss.value, (z, *augs))
    want = torch.autograd.grad(slow, (z, *augs))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_augmented_samples_beyond_the_margin_cost_nothing():
    g = torch.Generator().manual_seed(0)
    z = torch.tensor([1.0, 0.0, 0.0]) + 0.1 * torch.randn(4, 3, generator=g)
    # augmented samples opposite the benign cluster are beyond the margin: only the benign term is left
    far = clan_loss(z, -z, margin=0.6, alpha=0.5)
    assert far.item() == pytest.approx(0.5 * slow_clan(z, [], 0.6, 1.0, True).item(), rel=1e-5)
    # an augmented copy equal to its benign sample is a violated negative: the loss grows
    assert clan_loss(z, z.clone(), margin=0.6, alpha=0.5) > far
    # benign samples pulled together lower the loss
    assert clan_loss(z[:1].repeat(4, 1) + 1e-3 * z, -z, margin=0.6) < far


def test_anomaly_score_is_negative_cosine_to_the_benign_centroid_and_round_trips():
    obj = CLANAugmentedNegatives()
    with pytest.raises(RuntimeError, match="fit_centroid"):
        obj.anomaly_score(torch.randn(2, 3))
    benign = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.2]])
    obj.fit_centroid(benign)
    score = obj.anomaly_score(torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    assert torch.allclose(score, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    fresh = CLANAugmentedNegatives()
    fresh.load_state_dict(copy.deepcopy(obj.state_dict()))
    assert torch.equal(fresh.centroid, obj.centroid)


def test_bad_parameters_name_the_field():
    for name, value in (("alpha", 1.5), ("margin", 0.0), ("eps", -1.0)):
        with pytest.raises(sdk.ConfigError, match=name):
            CLANAugmentedNegatives(**{name: value})
    with pytest.raises(sdk.RequirementError, match="view"):
        CLANAugmentedNegatives()(sdk.Views(embeddings=(torch.randn(3, 2),)))
