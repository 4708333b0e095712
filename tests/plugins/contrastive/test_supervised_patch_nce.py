"""supervised_patch_nce against a per-patch loop of the ASP formula (Li et al., MICCAI 2023)."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.supervised_patch_nce import schedule_weight, supervised_patch_nce_loss


def slow_asp(q, k, t, p):
    """Per-patch cross-entropy over [positive, same-image negatives], weights p + (1-p) relu(s)
    renormalised to mean 1."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    losses, weights = [], []
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            sims = [float(q[b, i] @ k[b, j]) for j in range(q.shape[1])]
            den = sum(math.exp(s / t) for s in sims)
            losses.append(-math.log(math.exp(sims[i] / t) / den))
            weights.append(p + (1 - p) * max(sims[i], 0.0))
    mean_w = sum(weights) / len(weights)
    return sum(w / mean_w * l for w, l in zip(weights, losses)) / len(losses)


def patches(seed, b=3, p=5, d=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    return q, q + 0.8 * torch.randn(b, p, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("p", [1.0, 0.3, 0.0])
def test_matches_loop(p):
    q, k = patches(0)
    got = supervised_patch_nce_loss(q, k, temperature=0.2, p=p)
    assert got.item() == pytest.approx(slow_asp(q, k, 0.2, p), rel=1e-6)


def test_gradient_matches_finite_difference_of_loop():
    q, k = patches(1, b=2, p=3, d=3)
    q.requires_grad_()
    supervised_patch_nce_loss(q, k, temperature=0.5, p=0.4).backward()
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 2, 1), (0, 1, 2)]:
        qp, qm = q.detach().clone(), q.detach().clone()
        qp[idx] += eps
        qm[idx] -= eps
        # weights are detached in the method: finite differences must hold them fixed
        fd = (slow_fixed_weights(qp, k, q.detach(), 0.5, 0.4)
              - slow_fixed_weights(qm, k, q.detach(), 0.5, 0.4)) / (2 * eps)
        assert q.grad[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-6)


def slow_fixed_weights(q, k, q_for_weights, t, p):
    qn, kn, qw = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(q_for_weights, dim=-1)
    w = p + (1 - p) * (qw * kn).sum(-1).clamp_min(0)
    w = w / w.mean()
    logits = torch.einsum("bid,bjd->bij", qn, kn) / t
    ce = torch.logsumexp(logits, -1) - logits.diagonal(dim1=1, dim2=2)
    return float((w * ce).mean())


def test_weights_have_mean_one_and_grow_with_positive_similarity():
    from plugins.contrastive.supervised_patch_nce import adaptive_weights

    s = torch.tensor([-0.5, 0.1, 0.4, 0.9])
    w = adaptive_weights(s, 0.25)
    assert w.mean().item() == pytest.approx(1.0)
    assert (w.diff() >= 0).all() and w[0] < w[-1]
    assert torch.allclose(adaptive_weights(s, 1.0), torch.ones(4))


def test_adaptive_weighting_reduces_a_corrupted_pairs_share():
    """A misaligned ground-truth patch (random target) gets less of the loss and gradient under ASP
    (late training, p -> 0) than under plain supervised PatchNCE (p = 1)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 16, generator=g)
    k = q + 0.1 * torch.randn(1, 8, 16, generator=g)
    k[0, 0] = -q[0, 0] + 0.1 * torch.randn(16, generator=g)  # corrupted pair: opposite target

    def corrupted_grad_share(p):
        qq = q.clone().requires_grad_()
        supervised_patch_nce_loss(qq, k, p=p).backward()
        norms = qq.grad[0].norm(dim=-1)
        return float(norms[0] / norms.sum())

    assert corrupted_grad_share(0.0) < 0.1 * corrupted_grad_share(1.0)


def test_plugin_schedule_follows_progress_and_round_trips():
    obj = sdk.create("objective", "supervised_patch_nce", temperature=0.2)
    q, k = patches(4)
    views = sdk.Views(embeddings=(q.mean(1).float(),), extras={"patches": (q.float(), k.float())})
    obj.set_progress(10, 100)
    assert obj.p == 1.0
    assert obj(views).value.item() == pytest.approx(slow_asp(q, k, 0.2, 1.0), rel=1e-5)
    obj.set_progress(80, 100)  # lambda schedule: 1 - (0.8 - 0.5) / 0.5
    assert obj.p == pytest.approx(0.4)
    loss = obj(views)
    assert loss.value.item() == pytest.approx(slow_asp(q, k, 0.2, 0.4), rel=1e-5)
    assert loss.per_sample.shape == (3,)
    assert torch.allclose(loss.per_sample.mean(), loss.value)
    fresh = sdk.create("objective", "supervised_patch_nce", temperature=0.2)
    fresh.load_state_dict(obj.state_dict())
    assert fresh.p == pytest.approx(0.4)
    assert schedule_weight(0.0, "linear") == 1.0 and schedule_weight(1.0, "sigmoid") < 0.01


def test_two_views_are_one_image_of_batch_patches():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    obj = sdk.create("objective", "supervised_patch_nce", temperature=0.5)
    got = obj(sdk.Views(embeddings=(z1, z2))).value
    assert got.item() == pytest.approx(slow_asp(z1[None].double(), z2[None].double(), 0.5, 1.0), rel=1e-5)


def test_target_is_detached():
    q, k = patches(6)
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    supervised_patch_nce_loss(q, k).backward()
    assert k.grad is None and q.grad is not None
    supervised_patch_nce_loss(q, k, detach_target=False).backward()
    assert k.grad is not None


def test_bad_inputs_and_parameters():
    obj = sdk.create("objective", "supervised_patch_nce")
    with pytest.raises(sdk.ShapeError, match="patches"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),), extras={"patches": (torch.randn(2, 4, 3),
                                                                           torch.randn(2, 5, 3))}))
    with pytest.raises(sdk.RequirementError, match="views"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),)))
    for param, value in [("temperature", 0.0), ("schedule", "cosine"), ("decay_start", 1.0),
                         ("lookup", "bell")]:
        with pytest.raises(sdk.ConfigError, match=param):
            sdk.create("objective", "supervised_patch_nce", **{param: value})
