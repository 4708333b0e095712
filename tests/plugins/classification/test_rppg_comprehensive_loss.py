"""rppg_comprehensive_loss against a written-out DFT and Pearson (value and gradient), the
negative Pearson's invariances, and a signal at the true rate beating one 10 bpm off."""

import math

import pytest
import torch

import sdk


def slow(pred, gt, fs, low=45, high=149):
    rows = []
    n = pred.shape[1]
    k = torch.arange(n, dtype=torch.float64)
    w = 0.5 - 0.5 * torch.cos(2 * math.pi * k / (n - 1))  # the symmetric Hann window
    for i in range(pred.shape[0]):
        x = pred[i]
        mu = x.mean()
        sd = torch.sqrt(((x - mu) ** 2).sum() / (n - 1))
        s = (x - mu) / sd

        def power(sig, rate):
            f = rate / 60
            re = (w * sig * torch.cos(2 * math.pi * f * k / fs)).sum()
            im = (w * sig * torch.sin(2 * math.pi * f * k / fs)).sum()
            return re ** 2 + im ** 2

        p = torch.stack([power(s, r) for r in range(low, high + 1)])
        ca = p / p.sum()
        hr = int(torch.stack([power(gt[i], r) for r in range(low, high + 1)]).argmax())
        ce = torch.logsumexp(ca, 0) - ca[hr]
        a, b = s - s.mean(), gt[i] - gt[i].mean()
        pearson = (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())
        rows.append(ce + 0.2 * (1 - pearson))
    return torch.stack(rows)


def signal(rate_bpm, n=96, fs=30.0, phase=0.0):
    t = torch.arange(n, dtype=torch.float64) / fs
    return torch.sin(2 * math.pi * rate_bpm / 60 * t + phase)


def run(obj, pred, gt):
    return obj(sdk.Views(embeddings=(pred,)), sdk.Batch(targets=gt))


def test_matches_formula_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    gt = torch.stack([signal(72), signal(110, phase=1.0)])
    pred = (gt + 0.4 * torch.randn(2, 96, generator=g, dtype=torch.float64)).requires_grad_()
    got = run(sdk.create("objective", "rppg_comprehensive_loss"), pred, gt)
    want = slow(pred, gt, 30.0)
    assert torch.allclose(got.per_sample, want, rtol=1e-9)
    g1, g2 = (torch.autograd.grad(t.sum(), pred)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-7, atol=1e-12)


def test_negative_pearson_invariances():
    from plugins.classification.rppg_comprehensive_loss import neg_pearson

    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 50, generator=g, dtype=torch.float64)
    assert torch.allclose(neg_pearson(2.5 * s + 4.0, s), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(neg_pearson(-0.3 * s + 1.0, s), torch.full((3,), 2.0, dtype=torch.float64))


def test_the_true_rate_beats_a_shifted_one():
    gt = signal(80).expand(2, -1)
    pred = torch.stack([signal(80, phase=0.7), signal(90, phase=0.7)])  # same shape, 10 bpm off
    obj = sdk.create("objective", "rppg_comprehensive_loss", pearson_weight=0.0)
    ce = run(obj, pred, gt).per_sample
    assert ce[0] < ce[1]


def test_defaults_and_errors():
    obj = sdk.create("objective", "rppg_comprehensive_loss")
    assert (obj.fs, obj.ce_weight, obj.pearson_weight, obj.low_bpm, obj.high_bpm) == (30.0, 1.0, 0.2, 45, 149)
    with pytest.raises(sdk.ShapeError, match=r"rppg_comprehensive_loss: Batch.targets must be the ground-truth"):
        run(obj, torch.zeros(2, 10), torch.zeros(2, 9))
    with pytest.raises(sdk.ConfigError, match="high_bpm must exceed low_bpm"):
        sdk.create("objective", "rppg_comprehensive_loss", low_bpm=100, high_bpm=90)
