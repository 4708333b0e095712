"""ece / mce against an explicit bin loop, analytic cases, the bin-edge convention and netcal."""

import pytest
import torch

import sdk
from plugins.metrics.ece import ece, mce


def slow_bins(probs, labels, n_bins):
    """(count, mean confidence, accuracy) per bin, sample by sample; bins ((b-1)/M, b/M]."""
    conf = probs.max(1).values.tolist()
    pred = probs.argmax(1).tolist()
    out = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(conf) if (lo < c or b == 0) and c <= hi]
        if members:
            acc = sum(pred[i] == int(labels[i]) for i in members) / len(members)
            out.append((len(members), sum(conf[i] for i in members) / len(members), acc))
    return out


def slow_ece(probs, labels, n_bins=15):
    return sum(n / len(labels) * abs(acc - c) for n, c, acc in slow_bins(probs, labels, n_bins))


def slow_mce(probs, labels, n_bins=15):
    return max(abs(acc - c) for _, c, acc in slow_bins(probs, labels, n_bins))


def random_probs(seed, n=300, c=6, sharp=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = sharp * torch.randn(n, c, generator=g, dtype=dtype)
    return logits.softmax(1), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("n_bins", [1, 5, 15])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop(seed, n_bins):
    probs, labels = random_probs(seed)
    assert ece(probs, labels, n_bins) == pytest.approx(slow_ece(probs, labels, n_bins), abs=1e-12)
    assert mce(probs, labels, n_bins) == pytest.approx(slow_mce(probs, labels, n_bins), abs=1e-12)


def test_plugins_compute_the_functions():
    probs, labels = random_probs(2, dtype=torch.float32)
    for name, fn in (("ece", ece), ("mce", mce)):
        metric = sdk.create("metric", name, n_bins=10)
        metric.update(probs, labels)
        assert metric.compute() == pytest.approx(fn(probs, labels, 10), abs=1e-12)
        assert metric.compute() == pytest.approx((slow_ece if name == "ece" else slow_mce)(probs, labels, 10), abs=1e-6)


def test_perfectly_calibrated_is_zero_and_overconfident_is_the_gap():
    # bin of confidence 0.75: 3 of 4 right; bin of confidence 0.6: 6 of 10 right
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[0.4, 0.6]] * 10, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1] + [1] * 6 + [0] * 4)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert mce(probs, labels) == pytest.approx(0.0, abs=1e-12)
    labels = torch.tensor([0, 1, 0, 1] + [1, 0] * 5)  # accuracy 0.5 in both bins
    assert ece(probs, labels) == pytest.approx((4 * 0.25 + 10 * 0.1) / 14, abs=1e-12)
    assert mce(probs, labels) == pytest.approx(0.25, abs=1e-12)


def test_bins_are_closed_on_the_right():
    # confidence exactly 0.75 belongs to (0.5, 0.75], not to (0.75, 1] with the wrong 0.9
    probs = torch.tensor([[0.75, 0.25], [0.1, 0.9]])
    labels = torch.tensor([0, 0])
    assert ece(probs, labels, n_bins=4) == pytest.approx(0.5 * 0.25 + 0.5 * 0.9)  # left-closed: 0.325
    assert mce(probs, labels, n_bins=4) == pytest.approx(0.9)


def test_calibrated_sampling_has_small_ece_and_sharpening_raises_it():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(20000, 10, generator=g)
    probs = logits.softmax(1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # y ~ Cat(p): calibrated
    sharp = (logits / 0.5).softmax(1)
    assert ece(probs, labels) < 0.02
    assert ece(sharp, labels) > 5 * ece(probs, labels)
    assert mce(sharp, labels) > mce(probs, labels)


def test_matches_netcal_when_installed():
    netcal = pytest.importorskip("netcal.metrics")
    probs, labels = random_probs(3, n=500)
    p, y = probs.numpy(), labels.numpy()
    assert ece(probs, labels, 15) == pytest.approx(netcal.ECE(bins=15).measure(p, y), abs=1e-9)
    assert mce(probs, labels, 15) == pytest.approx(netcal.MCE(bins=15).measure(p, y), abs=1e-9)
