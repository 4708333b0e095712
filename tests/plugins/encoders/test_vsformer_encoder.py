"""vsformer_encoder: the Fisher prior and prior-enhanced attention against slow loops, and on
series whose classes differ only in level, value tokens that see it and shape tokens that cannot."""

import math

import pytest
import torch

import sdk
from plugins.encoders.vsformer_encoder import fisher_prior, prior_attention


def _slow_fisher(x, y):
    n, t, c = x.shape
    out = []
    for s in range(t):
        scores = []
        for ch in range(c):
            col = [float(x[i, s, ch]) for i in range(n)]
            mu = sum(col) / n
            between = within = 0.0
            for k in sorted(set(y.tolist())):
                members = [col[i] for i in range(n) if int(y[i]) == k]
                mk = sum(members) / len(members)
                between += len(members) * (mk - mu) ** 2
                within += sum((v - mk) ** 2 for v in members)
            scores.append(between / (within + 1e-5))
        out.append(sum(scores) / c)
    return torch.tensor(out)


def test_fisher_prior_equals_the_slow_loop_and_finds_the_discriminative_steps():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 10, 3, generator=g), torch.arange(30) % 3
    x[:, 4:7] += 2.0 * y[:, None, None]  # classes differ at steps 4, 5 and 6 only
    p = fisher_prior(x, y, 3)
    torch.testing.assert_close(p, _slow_fisher(x, y), rtol=1e-5, atol=1e-6)
    assert set(p.topk(3).indices.tolist()) == {4, 5, 6}
    enc = sdk.create("encoder", "vsformer_encoder", seq_len=10, in_features=3, dataset=x, labels=y,
                     shape_kernel=4, shape_stride=2, embed_dim=8, heads=2)
    # value tokens carry p_t, shape tokens their window's mean, all scaled to a maximum of 1
    windows = [p[s:s + 4].mean() for s in range(0, 7, 2)]
    torch.testing.assert_close(enc.prior, torch.stack([*p, *windows]) / p.max())
    # the prior enters every block's attention scores through its per-head gate
    series = torch.randn(4, 10, 3, generator=g)
    z = enc.eval()(series)
    with torch.no_grad():
        for block in enc.blocks:
            block.gate.zero_()
        assert (enc(series) - z).abs().max() > 1e-4
    plain = sdk.create("encoder", "vsformer_encoder", seq_len=10, in_features=3, shape_kernel=4,
                       embed_dim=8, heads=2)
    assert plain.prior.abs().sum() == 0  # no labels, no prior: the gates change nothing
    z = plain.eval()(series)
    with torch.no_grad():
        for block in plain.blocks:
            block.gate.zero_()
        torch.testing.assert_close(plain(series), z, rtol=0, atol=0)


def test_prior_attention_equals_the_slow_formula_and_favours_prior_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    prior, gate = torch.rand(5, generator=g, dtype=torch.float64), torch.tensor([0.0, 1.0, 2.5],
                                                                               dtype=torch.float64)
    out = prior_attention(q, k, v, prior, gate)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                s = [float(q[b, h, i] @ k[b, h, j]) / 2.0 + float(gate[h] * prior[j]) for j in range(5)]
                w = [math.exp(a - max(s)) for a in s]
                want = sum(wj * v[b, h, j] for wj, j in zip(w, range(5))) / sum(w)
                torch.testing.assert_close(out[b, h, i], want, rtol=1e-10, atol=1e-12)
    # with equal scores, the weight of each key grows with its prior
    weights = prior_attention(torch.zeros(1, 1, 1, 5), torch.zeros(1, 1, 5, 5),
                              torch.eye(5)[None, None],  # value j reads out the weight of key j
                              torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0]), torch.ones(1))[0, 0, 0]
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0]).softmax(0))
    assert (weights[1:] > weights[:-1]).all()


def _level_only(n, seed):
    """Two classes with the same random shapes, at levels -1 and +1: z-normalised, identical."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    t = torch.arange(16.0)
    phase, freq = torch.rand(n, 1, 2, generator=g) * 6.3, 0.3 + 0.5 * torch.rand(n, 1, 2, generator=g)
    shape = torch.sin(freq * t[None, :, None] + phase)
    level = (2.0 * y - 1)[:, None, None] + 0.3 * torch.randn(n, 1, 2, generator=g)
    return level + shape + 0.1 * torch.randn(n, 16, 2, generator=g), y


def _train(branches, x, y, xt, yt):
    torch.manual_seed(0)
    enc = sdk.create("encoder", "vsformer_encoder", seq_len=16, in_features=2, dataset=x, labels=y,
                     embed_dim=16, heads=2, depth=1, branches=branches)
    head = torch.nn.Linear(16, 2)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(head(enc(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (head(enc.eval()(xt)).argmax(1) == yt).float().mean()


def test_classes_that_differ_in_level_only_need_the_value_tokens():
    x, y = _level_only(64, 0)
    xt, yt = _level_only(64, 1)
    both, shape = _train("both", x, y, xt, yt), _train("shape", x, y, xt, yt)
    assert both >= 0.95
    assert shape <= 0.7  # z-normalised series of both classes look alike


def test_defaults_shapes_and_bad_input():
    enc = sdk.create("encoder", "vsformer_encoder")
    assert (enc.seq_len, enc.in_features, enc.out_dim, len(enc.blocks), enc.shape_kernel,
            enc.shape_stride, enc.branches) == (16, 4, 64, 2, 8, 4, "both")
    x = torch.randn(3, 16, 4)
    assert enc(x).shape == (3, 64)
    assert enc.prior.shape == (16 + 3,)  # 16 value tokens, (16 - 8) / 4 + 1 shape tokens
    torch.testing.assert_close(enc.eval()(x.flatten(1)), enc(x))
    assert enc.head is None and torch.equal(enc(x), enc.features(x))
    logits = sdk.create("encoder", "vsformer_encoder", out_dim=5).eval()
    assert logits.out_dim == 5 and logits(x).shape == (3, 5)
    torch.testing.assert_close(logits(x), logits.head(logits.features(x)))
    with pytest.raises(sdk.ShapeError, match=r"vsformer_encoder': x must be floating series \[B, 16, 4\]"):
        enc(torch.randn(3, 15, 4))
    with pytest.raises(sdk.ShapeError, match="x must be floating"):
        enc(torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(sdk.ConfigError, match="shape_kernel=8 is longer than seq_len=6"):
        sdk.create("encoder", "vsformer_encoder", seq_len=6)
    with pytest.raises(sdk.ConfigError, match="in_dim=10 is not seq_len x in_features"):
        sdk.create("encoder", "vsformer_encoder", in_dim=10)
    with pytest.raises(sdk.ConfigError, match="labels must be class ids"):
        sdk.create("encoder", "vsformer_encoder", dataset=torch.randn(5, 16, 4))
    with pytest.raises(sdk.ConfigError, match="dataset must hold floating series"):
        sdk.create("encoder", "vsformer_encoder", dataset=torch.randn(5, 10), labels=torch.zeros(5).long())
    with pytest.raises(sdk.ConfigError, match="branches must be one of"):
        sdk.create("encoder", "vsformer_encoder", branches="values")


def _few_steps_matter(n, seed):
    """Two classes that differ in level at steps 6-8 only, under noisier steps elsewhere."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 1.5 * torch.randn(n, 16, 2, generator=g)
    x[:, 6:9] = 0.6 * (2.0 * y - 1)[:, None, None] + 0.5 * torch.randn(n, 3, 2, generator=g)
    return x, y


def test_the_class_prior_steers_attention_to_the_discriminative_steps():
    x, y = _few_steps_matter(64, 0)
    xt, yt = _few_steps_matter(100, 1)
    assert set(fisher_prior(x, y, 2).topk(3).indices.tolist()) == {6, 7, 8}
    accs = {}
    for prior in (True, False):
        runs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            enc = sdk.create("encoder", "vsformer_encoder", seq_len=16, in_features=2,
                             dataset=x if prior else None, labels=y if prior else None,
                             embed_dim=16, heads=2, depth=1)
            head = torch.nn.Linear(16, 2)
            opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
            for _ in range(25):
                loss = torch.nn.functional.cross_entropy(head(enc(x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                runs.append(float((head(enc.eval()(xt)).argmax(1) == yt).float().mean()))
        accs[prior] = sum(runs) / len(runs)
    assert accs[True] >= 0.95 and accs[True] - accs[False] >= 0.04, accs
