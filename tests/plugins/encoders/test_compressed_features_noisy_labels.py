"""compressed_features_noisy_labels: nested dropout on the classifier's features."""

import math

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.encoders.compressed_features_noisy_labels import nested_probabilities

NAME = "compressed_features_noisy_labels"


def test_nested_distribution_equals_the_authors_gaussian_slow_loop():
    for n, sigma in ((5, 2.0), (128, 100.0)):
        w = [math.exp(-((k - 0.0) / sigma) ** 2) for k in range(1, n + 1)]
        expected = torch.tensor([v / sum(w) for v in w], dtype=torch.float64)
        torch.testing.assert_close(nested_probabilities(n, sigma), expected)


def _setup(**kw):
    enc = sdk.create("encoder", NAME, in_dim=6, hidden_dims=(7,), feat_dim=5, num_classes=3, **kw)
    return enc, torch.randn(8, 6, generator=torch.Generator().manual_seed(0))


def test_training_keeps_a_prefix_of_k_features_drawn_from_the_gaussian():
    enc, x = _setup(nested_sigma=2.0)
    enc.net.eval()                            # fixed features; the compression still trains
    h = enc.features(x).detach()
    w = enc.classifier.weight.detach()
    prefix = [h[:, :k] @ w[:, :k].T for k in range(1, 6)]
    counts = torch.zeros(5)
    torch.manual_seed(0)
    for _ in range(3000):
        z = enc.classifier(enc.compress(h))
        ks = [k for k in range(5) if torch.allclose(z, prefix[k], atol=1e-6)]
        assert len(ks) == 1
        counts[ks[0]] += 1
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, nested_probabilities(5, 2.0).float(), atol=0.03, rtol=0)


def test_defaults_none_and_eval():
    enc, x = _setup()
    assert enc.compression == "nested" and enc.eval_k is None and enc.dropout == 0.5
    torch.testing.assert_close(enc.k_probs, nested_probabilities(5, 100.0).float())
    assert enc.classifier.bias is None
    enc.eval()
    torch.testing.assert_close(enc(x), enc.features(x) @ enc.classifier.weight.T)
    enc.eval_k = 2
    h = enc.features(x)
    torch.testing.assert_close(enc(x), h[:, :2] @ enc.classifier.weight[:, :2].T)
    plain, x = _setup(compression="none")
    plain.net.eval()
    torch.testing.assert_close(plain(x), plain.features(x) @ plain.classifier.weight.T)


def test_dropout_variant_zeroes_and_rescales():
    enc = sdk.create("encoder", NAME, compression="dropout", dropout=0.25)
    torch.manual_seed(0)
    h = torch.ones(400, 128)
    out = enc.compress(h)
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_nested_dropout_resists_40_percent_symmetric_noise_on_digits():
    """The paper's claim: compressed features fit less of the label noise than plain CE."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1200], perm[1200:]
    noisy = y.clone()
    flip = torch.rand(len(y), generator=g) < 0.4
    noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)

    def accuracy(**kw):
        torch.manual_seed(0)
        enc = sdk.create("encoder", NAME, in_dim=64, hidden_dims=(128,), feat_dim=64,
                         num_classes=10, **kw)
        opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
        for _ in range(60):
            order = train[torch.randperm(len(train))]
            for i in range(0, len(order), 64):
                b = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(enc(x[b]), noisy[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        enc.eval()
        with torch.no_grad():
            return float((enc(x[test]).argmax(-1) == y[test]).float().mean())

    plain = accuracy(compression="none")
    nested = accuracy(compression="nested", nested_sigma=10.0, eval_k=8)
    assert nested > plain + 0.05, (plain, nested)


def test_errors():
    with pytest.raises(sdk.ConfigError, match="compression must be one of"):
        sdk.create("encoder", NAME, compression="ib")
    with pytest.raises(sdk.ConfigError, match="nested_sigma must be > 0"):
        sdk.create("encoder", NAME, nested_sigma=0.0)
    with pytest.raises(sdk.ConfigError, match="eval_k=200 exceeds the 128 features"):
        sdk.create("encoder", NAME, eval_k=200)
    enc = sdk.create("encoder", NAME, in_dim=8)
    with pytest.raises(sdk.ShapeError, match=rf"encoder '{NAME}': x \(flattened\) must be floating \[B, 8\]"):
        enc(torch.zeros(2, 9))
