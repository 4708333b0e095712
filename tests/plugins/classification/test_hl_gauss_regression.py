"""hl_gauss_regression against a written-out histogram (value and gradient), the histogram's
mass and mean, and a regression on scikit-learn's diabetes data no worse than MSE."""

import math

import pytest
import torch

import sdk


def slow(z, y, lo, hi, k, sigma):
    rows = []
    width = (hi - lo) / k
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    for i in range(z.shape[0]):
        t = min(max(float(y[i]), lo), hi)
        mass = [phi((lo + (j + 1) * width - t) / sigma) - phi((lo + j * width - t) / sigma) for j in range(k)]
        total = phi((hi - t) / sigma) - phi((lo - t) / sigma)
        lse = torch.log(sum(torch.exp(z[i, j]) for j in range(k)))
        rows.append(-sum(mass[j] / total * (z[i, j] - lse) for j in range(k)))
    return torch.stack(rows)


def run(obj, z, y):
    return obj(sdk.Views(logits=z), sdk.Batch(targets=y))


def test_matches_formula_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.3, -1.9, 2.0, 5.0, -0.05], dtype=torch.float64)  # 5.0: clipped to the support
    obj = sdk.create("objective", "hl_gauss_regression", min_value=-2.0, max_value=2.0, num_bins=8)
    got = run(obj, z, y)
    want = slow(z, y, -2.0, 2.0, 8, 0.75 * 4 / 8)
    assert torch.allclose(got.per_sample, want, rtol=1e-10)
    g1, g2 = (torch.autograd.grad(t.sum(), z)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-14)


def test_histogram_integrates_to_one_and_its_mean_is_the_target():
    # far inside the support the histogram's mean is y up to ~exp(-2 pi^2 sigma^2 / w^2) bin
    # widths w (the sampled Gaussian's aliasing); as sigma -> 0 on a fixed grid it tends to the
    # centre of y's bin instead
    from plugins.classification.hl_gauss_regression import histogram_target, support

    edges = support(-1.0, 1.0, 200, dtype=torch.float64)
    w, centres = 2 / 200, (edges[1:] + edges[:-1]) / 2
    y = torch.tensor([-0.4983, 0.013, 0.5777], dtype=torch.float64)
    errors = {}
    for ratio in (3.0, 0.75, 0.5, 0.25, 1e-4):
        p = histogram_target(y, edges, ratio * w)
        assert torch.allclose(p.sum(1), torch.ones(3, dtype=torch.float64), rtol=1e-12)
        assert (p >= 0).all()
        errors[ratio] = (p @ centres - y).abs().max().item() / w
    assert errors[3.0] < 1e-12 and errors[0.75] < 1e-4 and errors[0.5] < 1e-2
    assert errors[0.25] > errors[0.5] > errors[0.75]
    nearest = centres[((y[:, None] - centres).abs()).argmin(1)]
    assert torch.allclose(histogram_target(y, edges, 1e-4 * w) @ centres, nearest, atol=1e-12)


def test_a_target_decodes_to_itself_and_the_default_sigma():
    obj = sdk.create("objective", "hl_gauss_regression", min_value=0.0, max_value=10.0, num_bins=20)
    assert obj.sigma == pytest.approx(0.75 * 0.5)
    from plugins.classification.hl_gauss_regression import histogram_target

    y = torch.tensor([3.3, 6.1], dtype=torch.float64)
    logits = histogram_target(y, obj.edges, obj.sigma).log()  # the loss's minimiser
    assert torch.allclose(obj.predict(logits), y, atol=0.05)  # within a tenth of a bin


def test_diabetes_no_worse_than_mse():
    from sklearn.datasets import load_diabetes

    data, target = load_diabetes(return_X_y=True)
    x_all, y_all = torch.tensor(data, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    rmse = {"mse": [], "hl": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        _fit(x_all, y_all, rmse)
    finally:
        torch.set_num_threads(threads)
    mse, hl = (sum(v) / 3 for v in rmse.values())
    assert hl <= mse and 40 < hl < 70  # measured: MSE 62.9, HL-Gauss 60.3 (RMSE, 3 splits)


def _fit(x_all, y_all, rmse):
    for seed in range(3):
        perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
        tr, te = perm[:300], perm[300:]
        x = (x_all - x_all[tr].mean(0)) / x_all[tr].std(0)
        mu, sd = y_all[tr].mean(), y_all[tr].std()
        y = (y_all - mu) / sd
        obj = sdk.create("objective", "hl_gauss_regression", min_value=-3.0, max_value=4.0, num_bins=50)
        for mode, out in (("mse", 1), ("hl", 50)):
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, out))
            opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
            for _ in range(300):
                z = net(x[tr])
                loss = (((z[:, 0] - y[tr]) ** 2).mean() if mode == "mse"
                        else run(obj, z, y[tr]).value)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                z = net(x[te])
                pred = z[:, 0] if mode == "mse" else obj.predict(z)
                rmse[mode].append((((pred - y[te]) * sd) ** 2).mean().sqrt().item())


def test_errors():
    obj = sdk.create("objective", "hl_gauss_regression", num_bins=4)
    with pytest.raises(sdk.ShapeError, match=r"hl_gauss_regression: Views.logits must be \[B, num_bins=4\]"):
        run(obj, torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(sdk.ShapeError, match=r"hl_gauss_regression: Batch.targets must be real values \[3\]"):
        run(obj, torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(sdk.ConfigError, match="max_value must exceed min_value"):
        sdk.create("objective", "hl_gauss_regression", min_value=1.0, max_value=1.0)
    with pytest.raises(sdk.ConfigError, match="num_bins"):
        sdk.create("objective", "hl_gauss_regression", num_bins=1)
