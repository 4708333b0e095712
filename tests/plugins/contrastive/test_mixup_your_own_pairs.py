"""mixup_your_own_pairs (SupReMix): the loss against a loop that builds every mixture vector and
its mixed target explicitly (value and gradient), and the Mix-pos rule (exactly the pairs whose
targets bracket the anchor's within the window, mixed to the anchor's target)."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.mixup_your_own_pairs import MixupYourOwnPairs, supremix_loss


def slow_supremix(views, t, neg_alpha, tau, window, mix_neg, mix_pos, magnify, detach=True):
    """Per anchor: candidates (vector, target) = real rows, Mix-neg a z_i + (1-a) z_k with target
    a t_i + (1-a) t_k, Mix-pos b z_j + (1-b) z_k with b t_j + (1-b) t_k == t_i; positives are the
    candidates whose target equals the anchor's; weights |t_i - t_c| + 1 (distance magnifying).
    With ``detach`` the mixture vectors are built from detached rows (no gradient through them)."""
    z = torch.cat([F.normalize(v.double(), dim=1) for v in views])
    zm = z.detach() if detach else z
    tt = t.double().repeat(len(views))
    n = z.shape[0]
    total, count = 0.0, 0
    for i in range(n):
        cands = [(z[c], tt[c]) for c in range(n) if c != i]
        if mix_neg:
            cands += [(neg_alpha[i, k] * zm[i] + (1 - neg_alpha[i, k]) * zm[k],
                       neg_alpha[i, k] * tt[i] + (1 - neg_alpha[i, k]) * tt[k])
                      for k in range(n) if tt[k] != tt[i]]
        if mix_pos:
            for j in range(n):
                for k in range(n):
                    if tt[j] < tt[i] < tt[k] and tt[i] - tt[j] < window and tt[k] - tt[i] < window:
                        b = (tt[k] - tt[i]) / (tt[k] - tt[j])
                        mixed_t = b * tt[j] + (1 - b) * tt[k]
                        assert abs(float(mixed_t - tt[i])) < 1e-9  # the mixture's target is the anchor's
                        cands.append((b * zm[j] + (1 - b) * zm[k], mixed_t))
        weights = [abs(float(tc - tt[i])) + 1 if magnify else 1.0 for _, tc in cands]
        logits = [z[i] @ v / tau for v, _ in cands]
        log_den = torch.logsumexp(torch.stack([lg + math.log(w) for lg, w in zip(logits, weights)]), 0)
        pos = [lg for lg, (_, tc) in zip(logits, cands) if abs(float(tc - tt[i])) < 1e-9]
        if pos:
            total = total + sum(log_den - p for p in pos) / len(pos)
            count += 1
    return total / count


TARGETS = torch.tensor([1.0, 2.0, 2.0, 4.0, 9.0])


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("mix_neg,mix_pos,magnify", [(True, True, True), (False, True, True),
                                                     (True, False, False), (False, False, True)])
def test_matches_explicit_mixture_loop(mix_neg, mix_pos, magnify, detach):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.distributions.Beta(2.0, 8.0).sample((10, 10)).double()
    zn = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    t = TARGETS.repeat(2)
    loss, valid = supremix_loss(zn, zn, t, t, torch.arange(10), temperature=0.3, window=3.0,
                                neg_alpha=alpha, mix_negatives=mix_neg, mix_positives=mix_pos,
                                distance_magnifying=magnify, detach_mixtures=detach)
    value = (loss * valid).sum() / valid.sum()
    slow = slow_supremix([z1, z2], TARGETS, alpha, 0.3, 3.0, mix_neg, mix_pos, magnify, detach)
    assert value.item() == pytest.approx(slow.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(value, (z1, z2)), torch.autograd.grad(slow, (z1, z2))):
        assert torch.allclose(a, b, atol=1e-6)


def test_objective_equals_functional_form_and_supcon_when_all_parts_are_off():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    views, batch = sdk.Views(embeddings=(z1, z2)), sdk.Batch(targets=TARGETS[:, None])
    plain = MixupYourOwnPairs(mix_negatives=False, mix_positives=False, distance_magnifying=False,
                              temperature=0.3)
    supcon = sdk.create("objective", "nt_xent", temperature=0.3,
                        sampler=sdk.create("sampler", "label_positives"))
    labels = torch.tensor([0, 1, 1, 2, 3])
    assert plain(views, batch).value.item() == pytest.approx(
        supcon(views, sdk.Batch(targets=labels)).value.item(), rel=1e-5)
    torch.manual_seed(3)
    got = MixupYourOwnPairs(window=3.0)(views, batch).value
    torch.manual_seed(3)
    alpha = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(8.0)).sample((10, 10))
    want = slow_supremix([z1, z2], TARGETS, alpha.double(), 0.3, 3.0, True, True, True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_mixtures_are_detached_by_default_and_carry_gradient_when_not():
    """detach_mixtures=True is the default of the objective and of supremix_loss (the reference
    detaches its mixture tensor): the gradient then equals the loop's with mixture vectors built
    from detached rows; with False it equals the loop's with live mixtures; the two differ."""
    assert MixupYourOwnPairs().detach_mixtures is True
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    views, batch = sdk.Views(embeddings=(z1, z2)), sdk.Batch(targets=TARGETS)
    torch.manual_seed(5)
    alpha = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(8.0)).sample((10, 10)).double()
    grads = {}
    for detach in (True, False):
        slow = slow_supremix([z1, z2], TARGETS, alpha, 0.3, 3.0, True, True, True, detach)
        grads[detach] = torch.autograd.grad(slow, (z1, z2))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(grads[True], grads[False]))
    for obj, detach in ((MixupYourOwnPairs(window=3.0), True),
                        (MixupYourOwnPairs(window=3.0, detach_mixtures=False), False)):
        torch.manual_seed(5)
        got = torch.autograd.grad(obj(views, batch).value, (z1, z2))
        for a, b in zip(got, grads[detach]):
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
    zn = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    t = TARGETS.repeat(2)
    loss, valid = supremix_loss(zn, zn, t, t, torch.arange(10), window=3.0, neg_alpha=alpha.float())
    got = torch.autograd.grad((loss * valid).sum() / valid.sum(), (z1, z2))
    for a, b in zip(got, grads[True]):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_hard_pairs_make_the_task_harder():
    """Mix-neg adds near-anchor negatives: the loss of the same embeddings rises."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    views, batch = sdk.Views(embeddings=(z1, z2)), sdk.Batch(targets=torch.arange(8.0))
    base = MixupYourOwnPairs(mix_negatives=False, mix_positives=False)(views, batch).value
    assert MixupYourOwnPairs(mix_positives=False)(views, batch).value > base


def test_bad_parameters_and_targets_name_the_field():
    for name in ("temperature", "window", "neg_beta_a", "neg_beta_b"):
        with pytest.raises(sdk.ConfigError, match=name):
            MixupYourOwnPairs(**{name: 0.0})
    views = sdk.Views(embeddings=(torch.randn(3, 2), torch.randn(3, 2)))
    with pytest.raises(sdk.RequirementError, match="targets"):
        MixupYourOwnPairs()(views, sdk.Batch(targets=torch.zeros(3, 2)))
