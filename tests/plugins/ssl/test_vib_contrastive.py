"""CVIB (vib_contrastive) against explicit loops, its closed forms and reductions."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.ssl.vib_contrastive import self_pruning_contrast, vib_kl


def slow_contrast(a, c, t):
    """Per anchor -log( e^{cos(a_i, c_i)/t} / sum_j e^{cos(a_i, c_j)/t} ), loops."""
    out = []
    for i in range(a.shape[0]):
        cos = [torch.dot(a[i], c[j]) / (a[i].norm() * c[j].norm()) for j in range(c.shape[0])]
        den = sum(torch.exp(x / t) for x in cos)
        out.append(-torch.log(torch.exp(cos[i] / t) / den))
    return out


def slow_ce(logits, y):
    return [-(logits[i, y[i]] - torch.log(sum(torch.exp(v) for v in logits[i])))
            for i in range(logits.shape[0])]


def test_kl_is_vibnets_closed_form():
    mu = torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64)
    log_var = torch.tensor([-9.0, 0.0, 1.0, math.log(0.25)], dtype=torch.float64)
    want = 0.5 * sum(math.log(1 + m ** 2 / (math.exp(v) + 1e-8)) for m, v in zip(mu.tolist(),
                                                                               log_var.tolist()))
    assert vib_kl(mu, log_var).item() == pytest.approx(want, rel=1e-12)
    # a dimension whose noise swamps its mean carries (almost) no information
    assert vib_kl(torch.ones(1), torch.tensor([20.0])).item() == pytest.approx(0.0, abs=1e-8)


def test_contrast_matches_loop_and_offsets_the_positive():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    c = torch.randn(7, 4, generator=g, dtype=torch.float64)
    got = self_pruning_contrast(a, c, 0.1, offset=2)
    want = slow_contrast(a, torch.cat([c[2:5], c[:2], c[5:]]), 0.1)  # positives moved in front
    assert torch.allclose(got, torch.stack(want), atol=1e-10)


def make(**kw):
    obj = sdk.create("objective", "vib_contrastive", num_classes=3, **kw).double()
    h = torch.randn(2, 5, dtype=torch.float64)
    obj.eval()(sdk.Views(embeddings=(h,)), sdk.Batch(targets=torch.tensor([0, 1])))  # materialise
    return obj


def test_eval_value_and_gradients_match_loops_with_pruned_dimensions():
    obj = make(sdcl=0.7, temperature=0.2, kl=0.01)
    with torch.no_grad():
        obj.mask.mu.copy_(torch.tensor([1.2, 0.8, -0.5, 1.0, 0.9]))
        obj.mask.log_var.copy_(torch.tensor([-3.0, -1.0, -2.0, 2.0, -4.0]))  # dim 3 is pruned
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    loss = obj(sdk.Views(embeddings=(h,)), sdk.Batch(targets=y))
    mu, log_var = obj.mask.mu, obj.mask.log_var
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    z = h * (mu.detach() * keep)
    w, b = obj.classifier.weight, obj.classifier.bias
    ce_h, ce_z = slow_ce(h @ w.T + b, y), slow_ce(z @ w.T + b, y)
    sc_main = slow_contrast(z.detach(), h, 0.2)
    sc_sub = slow_contrast(z, h.detach(), 0.2)
    kl = 0.5 * sum(torch.log(1 + mu[d] ** 2 / (torch.exp(log_var[d]) + 1e-8)) for d in range(5))
    want = sum(ce_h[i] + 0.7 * sc_main[i] + ce_z[i] + 0.7 * sc_sub[i] for i in range(6)) / 6
    want = want + 0.01 * kl
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    params = [h, w, b, mu, log_var]
    got = torch.autograd.grad(loss.value, params)
    expected = torch.autograd.grad(want, params)
    for x, e in zip(got, expected):
        assert torch.allclose(x, e, atol=1e-10)
    assert loss.logs["kept"].item() == pytest.approx(0.8)


def test_training_samples_the_mask_per_sample():
    obj = make(kl=0.0, sdcl=0.0).train()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(3)
    loss = obj(sdk.Views(embeddings=(h,)), sdk.Batch(targets=y))
    torch.manual_seed(3)
    eps = torch.randn(4, 5, dtype=torch.float64)
    s = obj.mask.mu + eps * (0.5 * obj.mask.log_var).exp()
    logits = lambda x: x @ obj.classifier.weight.T + obj.classifier.bias  # noqa: E731
    want = F.cross_entropy(logits(h), y) + F.cross_entropy(logits(h * s), y)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    assert not torch.allclose(s[0], s[1])  # noise drawn per sample


def test_defaults_follow_the_reference_scripts_and_initialisation():
    obj = sdk.create("objective", "vib_contrastive")
    assert (obj.sdcl, obj.temperature, obj.kl, obj.num_classes) == (0.5, 0.1, 2.5e-7, 10)
    torch.manual_seed(0)
    obj(sdk.Views(embeddings=(torch.randn(4, 300),)), sdk.Batch(targets=torch.tensor([0, 1, 2, 3])))
    assert obj.mask.mu.mean().item() == pytest.approx(1.0, abs=0.01)
    assert obj.mask.log_var.mean().item() == pytest.approx(-9.0, abs=0.01)
    with pytest.raises(sdk.ShapeError, match="Batch.targets"):
        obj(sdk.Views(embeddings=(torch.randn(2, 300),)), sdk.Batch(targets=torch.tensor([0, 10])))
