"""intra_inter_correlation (FOD): the Gaussian prior and the losses against plain loops (value and
the two stages' gradients), the anomaly map's formula, the reference's running mean, and the
measured ranking of corrupted digit patches above clean ones."""

import math

import pytest
import torch

import sdk
from plugins.masked.intra_inter_correlation import gaussian_prior
from sdk import keys
from sdk.masking import patchify
from sdk.metrics import auroc


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "intra_inter_correlation", **{
        "in_dim": 3, "grid": (2, 3), "dim": 8, "heads": 2, "depth": 2, **kw}).double()


def _views(x):
    return sdk.Views(embeddings=(x.mean(1),), extras={keys.FEATURES: (x,)})


def _slow_prior(sigma, rows, cols):
    b, h, n, _ = sigma.shape
    out = torch.zeros(b, h, n, n, dtype=torch.float64)
    for i in range(b):
        for k in range(h):
            for l in range(n):
                s1, s2 = sigma[i, k, l]
                for s in range(n):
                    dy, dx = l // cols - s // cols, l % cols - s % cols
                    out[i, k, l, s] = (math.exp(-dy ** 2 / (2 * s1 ** 2) - dx ** 2 / (2 * s2 ** 2))
                                       / (2 * math.pi * s1 * s2))
                out[i, k, l] /= out[i, k, l].sum()
    return out


def test_gaussian_prior_equals_the_loop():
    sigma = 0.3 + torch.rand(2, 2, 6, 2, generator=_g(), dtype=torch.float64)
    from plugins.masked.intra_inter_correlation import square_distances
    dy2, dx2 = square_distances((2, 3))
    torch.testing.assert_close(gaussian_prior(sigma, dy2, dx2), _slow_prior(sigma, 2, 3))


def _kl(p, q):  # symmetric-KL building block of the authors': sum p (log(p + 1e-4) - log(q + 1e-4))
    total = torch.zeros(p.shape[0], dtype=torch.float64)
    for i in range(p.shape[0]):
        acc = 0.0
        for k in range(p.shape[1]):
            for l in range(p.shape[2]):
                acc = acc + sum(p[i, k, l, s] * (torch.log(p[i, k, l, s] + 1e-4) - torch.log(q[i, k, l, s] + 1e-4))
                                for s in range(p.shape[3]))
        total[i] = acc / (p.shape[1] * p.shape[2])
    return total


def _ent(p):
    total = torch.zeros(p.shape[0], dtype=torch.float64)
    for i in range(p.shape[0]):
        total[i] = -sum(p[i, k, l, s] * torch.log(p[i, k, l, s] + 1e-4) for k in range(p.shape[1])
                        for l in range(p.shape[2]) for s in range(p.shape[3])) / (p.shape[1] * p.shape[2])
    return total


def _slow_loss(obj, x):
    """The authors' two stages written out: stage 1 (correlations detached) and stage 2 (priors
    detached), summed; KL symmetric, averaged over rows, heads and layers."""
    out, maps = obj.run(x)
    rec = torch.stack([sum(((out[i, l] - x[i, l]) ** 2).mean() + 1 - out[i, l] @ x[i, l]
                           / (out[i, l].norm() * x[i, l].norm()) for l in range(x.shape[1])) / x.shape[1]
                       for i in range(x.shape[0])])
    n = len(maps)
    s1 = s2 = rec
    for a, pa, c, pc in maps:
        s1 = s1 + obj.lambda1 / n * ((_kl(pa, a.detach()) + _kl(a.detach(), pa))
                                     - (_kl(pc, c.detach()) + _kl(c.detach(), pc)))
        s2 = s2 + (- obj.lambda1 / n * (_kl(pa.detach(), a) + _kl(a, pa.detach())) - obj.lambda2 / n * _ent(a)
                   + obj.lambda1 / n * (_kl(pc.detach(), c) + _kl(c, pc.detach())) + obj.lambda2 / n * _ent(c))
    return (s1 + s2).mean()


def test_loss_value_and_the_two_stages_gradients_equal_the_slow_formula():
    obj = _obj(lambda1=0.7, lambda2=0.3)
    obj.set_reference(torch.randn(5, 6, 3, generator=_g(3), dtype=torch.float64))
    x = torch.randn(3, 6, 3, generator=_g(1), dtype=torch.float64)
    loss = obj(_views(x), sdk.Batch(index=torch.arange(3)))
    slow = _slow_loss(obj, x)
    torch.testing.assert_close(loss.value.double(), slow, rtol=1e-6, atol=1e-8)
    params = [p for p in obj.parameters()]
    got = torch.autograd.grad(loss.value, params, allow_unused=True)
    want = torch.autograd.grad(slow, params, allow_unused=True)
    for (name, _), g, w in zip(obj.named_parameters(), got, want):
        g = torch.zeros(1) if g is None else g
        w = torch.zeros(1) if w is None else w
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-8, msg=name)
    # the priors' scales get only stage 1's gradient (the priors' KL terms, correlations fixed)
    sig = [obj.layers[i].intra.sigma.weight for i in range(2)] + [obj.layers[i].inter.sigma.weight for i in range(2)]
    g_sigma = torch.autograd.grad(obj(_views(x), sdk.Batch()).value, sig)
    assert min(float(g.abs().max()) for g in g_sigma) > 1e-8


def test_anomaly_map_is_reconstruction_times_the_inter_discrepancy():
    obj = _obj()
    x = torch.randn(2, 6, 3, generator=_g(4), dtype=torch.float64)
    out, maps = obj.run(x)
    kl = sum(_kl_rows_slow(c, t) + _kl_rows_slow(t, c) for _, _, c, t in maps) / len(maps)
    s = torch.softmax(-kl, dim=1)
    rec = (out - x).pow(2).mean(-1) + 1 - torch.nn.functional.cosine_similarity(out, x, dim=-1)
    torch.testing.assert_close(obj.score(x), rec * (s.max(1, keepdim=True).values - s))


def _kl_rows_slow(p, q):
    b, h, n, _ = p.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        for l in range(n):
            with torch.no_grad():
                out[i, l] = sum((p[i, k, l] * ((p[i, k, l] + 1e-4).log() - (q[i, k, l] + 1e-4).log())).sum()
                                for k in range(h)) / h
    return out


def test_reference_is_the_running_mean_until_set():
    obj = _obj().train()
    a = torch.randn(3, 6, 3, generator=_g(5), dtype=torch.float64)
    b = torch.randn(5, 6, 3, generator=_g(6), dtype=torch.float64)
    ref_before = obj.reference.clone()
    first = obj(_views(a), sdk.Batch())
    obj(_views(b), sdk.Batch())
    torch.testing.assert_close(obj.reference, torch.cat([a, b]).mean(0))
    assert int(obj.seen) == 8
    # the loss used the reference from before its own batch
    obj2 = _obj()
    torch.testing.assert_close(obj2(_views(a), sdk.Batch()).value, first.value)
    torch.testing.assert_close(obj2.reference, a.mean(0))
    assert not torch.allclose(ref_before, a.mean(0))
    with torch.no_grad():
        obj(_views(a), sdk.Batch())
    assert int(obj.seen) == 8  # no update without gradient (validation)
    obj.set_reference(b)
    obj(_views(a), sdk.Batch())
    torch.testing.assert_close(obj.reference, b.mean(0))


def test_corrupted_digit_patches_score_above_clean_ones():
    """Trained on clean digits' 2x2 patches (16 tokens, standardised pixels), the map ranks
    patches overwritten by uniform noise above the clean patches of the same images, far better
    than the same model untrained."""
    data = sdk.data.load("digits")
    pixels = data.train.tensors[0].float()
    mean, std = pixels.mean(), pixels.std()
    x = patchify(((pixels[:384] - mean) / std).view(-1, 1, 8, 8), 2)  # [N, 16, 4]
    test = patchify(data.test.tensors[0][:64].float().view(-1, 1, 8, 8), 2).clone()
    g = _g(7)
    bad = torch.zeros(64, 16, dtype=torch.bool)
    bad[torch.arange(64), torch.randint(0, 16, (64,), generator=g)] = True
    test[bad] = torch.rand(int(bad.sum()), 4, generator=g)
    test = (test - mean) / std
    torch.manual_seed(0)
    obj = sdk.create("objective", "intra_inter_correlation", in_dim=4, grid=(4, 4), dim=16,
                     heads=2, depth=1)
    obj.set_reference(x)

    def measured():
        obj.eval()
        with torch.no_grad():
            value = auroc(obj.score(test).flatten(), bad.flatten())
        obj.train()
        return value

    untrained = measured()
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    for step in range(120):
        loss = obj(_views(x[(step * 64) % 384:(step * 64) % 384 + 64]), sdk.Batch())
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    trained = measured()
    assert trained > 0.75 and trained > untrained + 0.1, (trained, untrained)


def test_defaults_are_the_papers():
    obj = sdk.create("objective", "intra_inter_correlation")
    assert (obj.lambda1, obj.lambda2) == (0.5, 0.5)
    assert len(obj.layers) == 3 and obj.layers[0].intra.heads == 8 and obj.embed.out_features == 256
    assert obj.grid == (4, 4) and obj.in_dim == 64 and obj.batch_coupled is False
    # the scale map: sigma = 3^(sigmoid(5 a) + 1e-5) - 1, at a = 0.1
    att = obj.layers[0].intra
    with torch.no_grad():
        att.sigma.weight.zero_()
        att.sigma.bias.fill_(0.1)
    q = torch.randn(1, 16, 256)
    _, _, prior = att(q, q)
    from plugins.masked.intra_inter_correlation import square_distances
    s = torch.full((1, 8, 16, 2), 3 ** (1 / (1 + math.exp(-0.5)) + 1e-5) - 1, dtype=torch.float64)
    torch.testing.assert_close(prior.double(), gaussian_prior(s, *square_distances((4, 4))), rtol=1e-5, atol=1e-6)


def test_errors_name_the_plugin_and_the_field():
    obj = _obj()
    with pytest.raises(sdk.RequirementError, match="intra_inter_correlation"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),)), sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="'intra_inter_correlation'.*features.*\\[B, 6, 3\\]"):
        obj(_views(torch.randn(2, 5, 3, dtype=torch.float64)), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="intra_inter_correlation: grid"):
        sdk.create("objective", "intra_inter_correlation", grid=(16,))
    with pytest.raises(sdk.ConfigError, match="intra_inter_correlation: dim"):
        sdk.create("objective", "intra_inter_correlation", dim=12, heads=8)
    with pytest.raises(sdk.ConfigError, match="intra_inter_correlation: lambda1 must be >= 0"):
        sdk.create("objective", "intra_inter_correlation", lambda1=-1.0)
    with pytest.raises(sdk.ShapeError, match="intra_inter_correlation: reference"):
        obj.set_reference(torch.randn(4, 3))
