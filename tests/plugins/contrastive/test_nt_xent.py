"""nt_xent against an explicit loop over anchors (SimCLR / SupCon definitions)."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.nt_xent import nt_xent_loss


def slow_supcon(views, labels, t):
    """SupCon L_out written anchor by anchor; with labels = sample ids it is SimCLR's NT-Xent."""
    z = [F.normalize(v, dim=1) for v in views]
    rows = [(zi, lab) for v in z for zi, lab in zip(v, labels)]
    total = 0.0
    for i, (zi, yi) in enumerate(rows):
        den = sum(math.exp(float(zi @ zk) / t) for k, (zk, _) in enumerate(rows) if k != i)
        pos = [k for k, (_, yk) in enumerate(rows) if k != i and yk == yi]
        total += -sum(math.log(math.exp(float(zi @ rows[p][0]) / t) / den) for p in pos) / len(pos)
    return total / len(rows)


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_matches_loop(n_views, t):
    g = torch.Generator().manual_seed(n_views)
    views = [torch.randn(6, 4, generator=g) for _ in range(n_views)]
    expected = slow_supcon(views, list(range(6)), t)
    assert nt_xent_loss(*views, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_supcon_with_label_positives():
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 5, generator=g) for _ in range(2)]
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    obj = sdk.create("objective", "nt_xent", temperature=0.2,
                     sampler=sdk.create("sampler", "label_positives"))
    loss = obj(sdk.Views(embeddings=tuple(views)), sdk.Batch(targets=labels))
    assert loss.value.item() == pytest.approx(slow_supcon(views, labels.tolist(), 0.2), rel=1e-5)


def test_same_index_sampler_equals_default():
    g = torch.Generator().manual_seed(2)
    views = sdk.Views(embeddings=(torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)))
    explicit = sdk.create("objective", "nt_xent", sampler=sdk.create("sampler", "same_index"))
    assert torch.allclose(explicit(views).value, sdk.create("objective", "nt_xent")(views).value)


def test_per_sample_averages_views_and_is_scale_invariant():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    obj = sdk.create("objective", "nt_xent")
    loss = obj(sdk.Views(embeddings=(z1, z2)))
    assert loss.per_sample.shape == (5,)
    assert torch.allclose(loss.per_sample.mean(), loss.value)
    scaled = obj(sdk.Views(embeddings=(3 * z1, 0.5 * z2))).value
    assert torch.allclose(scaled, loss.value)  # cosine similarity


def test_pair_weights_scale_negatives():
    class HalfNegatives(sdk.interfaces.Sampler):
        def pairs(self, views, batch):
            n = views.n_views * views.batch_size
            ids = torch.arange(views.batch_size).repeat(views.n_views)
            same = ids[:, None] == ids[None, :]
            return sdk.Pairs(positive=same, negative=~same, weight=torch.where(same, 1.0, 0.5) * torch.ones(n, n))

    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    expected = 0.0
    for i in range(8):
        p = (i + 4) % 8
        den = sum((1.0 if k == p else 0.5) * math.exp(float(z[i] @ z[k]) / t) for k in range(8) if k != i)
        expected += -math.log(math.exp(float(z[i] @ z[p]) / t) / den) / 8
    got = nt_xent_loss(z1, z2, temperature=t, sampler=HalfNegatives())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_perfect_alignment_lower_than_random():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(16, 8, generator=g)
    assert nt_xent_loss(z, z).item() < nt_xent_loss(z, torch.randn(16, 8, generator=g)).item()


def test_no_nan_gradient_with_fully_masked_rows():
    class NoPositives(sdk.interfaces.Sampler):
        def pairs(self, views, batch):
            n = views.n_views * views.batch_size
            pos = torch.zeros(n, n, dtype=torch.bool)
            pos[0, n // 2] = True
            return sdk.Pairs(positive=pos, negative=torch.zeros(n, n, dtype=torch.bool))

    z1 = torch.randn(4, 3, requires_grad=True)
    loss = nt_xent_loss(z1, torch.randn(4, 3), sampler=NoPositives())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("n_views", [2, 3])
def test_fused_instance_path_gradient_equals_masked_path(n_views):
    g = torch.Generator().manual_seed(6)
    views = [torch.randn(9, 5, generator=g, requires_grad=True) for _ in range(n_views)]
    fast = nt_xent_loss(*views, temperature=0.2)
    masked = nt_xent_loss(*views, temperature=0.2, sampler=sdk.create("sampler", "same_index"))
    torch.testing.assert_close(fast, masked)
    for a, b in zip(torch.autograd.grad(fast, views), torch.autograd.grad(masked, views)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
