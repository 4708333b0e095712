"""histogram_binning against a sample-by-sample loop, the bin edges (0 in the first bin, 1 in
the last), empty bins, and its effect on held-out digits."""

import pytest
import torch

import sdk


def slow_calibrate(p_fit, y_fit, p, n_bins=15):
    """theta per class and bin by loops; empty bins keep p; renormalised (binary: class 1)."""
    n, c = p_fit.shape

    def bin_of(v):
        return next(b for b in range(n_bins) if v <= (b + 1) / n_bins or b == n_bins - 1)

    out = torch.zeros(p.shape, dtype=torch.float64)
    for i in range(p.shape[0]):
        for k in range(c):
            b = bin_of(float(p[i, k]))
            members = [j for j in range(n) if bin_of(float(p_fit[j, k])) == b]
            out[i, k] = (sum(int(y_fit[j]) == k for j in members) / len(members) if members
                         else float(p[i, k]))
    if c == 2:
        return torch.stack([1 - out[:, 1], out[:, 1]], 1)
    return out / out.sum(1, keepdim=True)


@pytest.mark.parametrize("c", [2, 4])
def test_matches_loop(c):
    g = torch.Generator().manual_seed(c)
    y = torch.randint(0, c, (120,), generator=g)
    p = (2 * torch.nn.functional.one_hot(y, c) + torch.randn(120, c, generator=g, dtype=torch.float64)).softmax(1)
    q = (torch.randn(40, c, generator=g, dtype=torch.float64) * 2).softmax(1)
    cal = sdk.create("calibrator", "histogram_binning").fit(p, y)
    assert torch.allclose(cal(q), slow_calibrate(p, y, q), atol=1e-12)
    assert torch.allclose(cal(q).sum(1), torch.ones(40, dtype=torch.float64))


def test_edges_zero_one_and_bin_boundaries():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    cal = sdk.create("calibrator", "histogram_binning", n_bins=5).fit(p, y)
    # class 1 probabilities 0, 0, 1, 0.4, 0.8: bin 1 holds the two zeros (one positive),
    # bin 5 the 1.0, bin 2 = (0.2, 0.4] holds 0.4, bin 4 = (0.6, 0.8] holds 0.8
    assert cal.count[1].tolist() == [2, 1, 0, 1, 1]
    assert cal.positives[1].tolist() == [1, 0, 0, 1, 1]
    out = cal(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    assert out[:, 1].tolist() == [0.5, 0.5, 1.0]  # 0.5 lies in the empty bin (0.4, 0.6]: kept


@pytest.mark.parametrize("dataset, ece_ratio, nll_ratio", [("digits", 0.7, 0.35), ("breast_cancer", 0.25, 0.3)])
def test_improves_naive_bayes_on_held_out_data(held_out, metrics, dataset, ece_ratio, nll_ratio):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out(dataset, "nb")
    base = z_te.softmax(1)
    p = sdk.create("calibrator", "histogram_binning").fit(z_cal.softmax(1), y_cal)(base)
    assert ece(p, y_te) < ece_ratio * ece(base, y_te) and nll(p, y_te) < nll_ratio * nll(base, y_te)


def test_errors():
    cal = sdk.create("calibrator", "histogram_binning")
    with pytest.raises(sdk.NotFittedError, match="histogram_binning"):
        cal(torch.full((3, 2), 0.5))
    with pytest.raises(sdk.ShapeError, match="'histogram_binning': labels hold one class only"):
        cal.fit(torch.full((3, 2), 0.5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(sdk.ConfigError, match="n_bins"):
        sdk.create("calibrator", "histogram_binning", n_bins=0)
