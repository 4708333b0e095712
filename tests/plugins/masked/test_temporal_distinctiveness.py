"""temporal_distinctiveness (TeD-SPAD): the triplet against a plain loop and torch's
TripletMarginLoss (value and gradient), its analytic zero set, and the measured effect of
training on synthetic clips: time becomes separable in the features."""

import math

import pytest
import torch

import sdk


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow(a, p, n, margin, eps):
    total = 0.0
    for i in range(a.shape[0]):
        dp = math.sqrt(sum((float(a[i, k] - p[i, k]) + eps) ** 2 for k in range(a.shape[1])))
        dn = math.sqrt(sum((float(a[i, k] - n[i, k]) + eps) ** 2 for k in range(a.shape[1])))
        total += max(0.0, dp - dn + margin)
    return total / a.shape[0]


def test_loss_equals_the_loop_and_torchs_triplet_value_and_gradient():
    g = _g()
    a, p, n = (torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    obj = sdk.create("objective", "temporal_distinctiveness", margin=0.7)
    loss = obj(sdk.Views(embeddings=(a, p, n)), sdk.Batch())
    assert abs(float(loss.value.detach()) - _slow(a, p, n, 0.7, 1e-6)) < 1e-10
    ref = torch.nn.TripletMarginLoss(margin=0.7)(a, p, n)
    torch.testing.assert_close(loss.value, ref)
    for x, y in zip(torch.autograd.grad(loss.value, (a, p, n)), torch.autograd.grad(ref, (a, p, n))):
        torch.testing.assert_close(x, y)


def test_further_views_are_further_negatives_averaged():
    g = _g(2)
    a, p, n1, n2 = (torch.randn(4, 3, generator=g) for _ in range(4))
    obj = sdk.create("objective", "temporal_distinctiveness")
    four = obj(sdk.Views(embeddings=(a, p, n1, n2)), sdk.Batch()).per_sample
    one = [obj(sdk.Views(embeddings=(a, p, n)), sdk.Batch()).per_sample for n in (n1, n2)]
    torch.testing.assert_close(four, (one[0] + one[1]) / 2)


def test_zero_once_the_other_time_is_a_margin_farther():
    a = torch.zeros(3, 2)
    p = torch.tensor([[0.5, 0.0]] * 3)
    n = torch.tensor([[2.0, 0.0], [1.5, 0.0], [1.0, 0.0]])
    per = sdk.create("objective", "temporal_distinctiveness")(sdk.Views(embeddings=(a, p, n)),
                                                              sdk.Batch()).per_sample
    torch.testing.assert_close(per, torch.tensor([0.0, 0.0, 0.5]), atol=1e-5, rtol=0)


def test_training_makes_clips_of_one_video_distinct_in_time():
    """Synthetic videos: a clip's frames are a random video identity plus a drift along time; an
    encoder trained with the triplet (positive: the same clip re-noised, negative: another start
    time) separates clips of one video by time far more than an untrained one."""
    g = _g(1)
    d, t = 16, 8
    drift = torch.randn(d, generator=g) * 0.3

    def clips(identity, start):
        frames = identity[:, None] + start[:, None, None] * drift + 0.05 * torch.arange(t)[:, None] * drift
        return (frames + 0.3 * torch.randn(frames.shape, generator=g)).flatten(1)  # [B, t * d]

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(t * d, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))

    def ratio():
        identity = torch.randn(256, d, generator=g) * 2
        s1, s2 = torch.rand(256, generator=g) * 4, torch.rand(256, generator=g) * 4
        with torch.no_grad():
            z1, z2, z1b = enc(clips(identity, s1)), enc(clips(identity, s2)), enc(clips(identity, s1))
        far = (s1 - s2).abs() > 2
        return float(((z1 - z2).norm(dim=1)[far] / (z1 - z1b).norm(dim=1)[far]).mean())

    before = ratio()
    obj = sdk.create("objective", "temporal_distinctiveness")
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(150):
        identity = torch.randn(64, d, generator=g) * 2
        s, other = torch.rand(64, generator=g) * 4, torch.rand(64, generator=g) * 4
        loss = obj(sdk.Views(embeddings=(enc(clips(identity, s)), enc(clips(identity, s)),
                                         enc(clips(identity, other)))), sdk.Batch())
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    after = ratio()
    assert after > 2 * before and after > 3, (before, after)


def test_defaults_are_the_authors():
    obj = sdk.create("objective", "temporal_distinctiveness")
    assert obj.margin == 1.0 and obj.eps == 1e-6 and obj.batch_coupled is False


def test_errors_name_the_plugin_and_the_field():
    obj = sdk.create("objective", "temporal_distinctiveness")
    z = torch.randn(4, 3)
    with pytest.raises(sdk.RequirementError, match="temporal_distinctiveness"):
        obj(sdk.Views(embeddings=(z, z)), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="temporal_distinctiveness: margin must be >= 0"):
        sdk.create("objective", "temporal_distinctiveness", margin=-0.1)
