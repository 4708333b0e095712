"""h_calibration: the loss equals a slow per-class loop (windows, k-means, cluster means; value
and gradient), is small on calibrated data and large on sharpened data, the map is monotone
and keeps the argmax, and it calibrates naive Bayes on held-out digits and breast cancer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.calibration.h_calibration import h_calibration_loss, monotone_map


def slow_kmeans(x, k, iters=25):
    """Lloyd's iterations from the (j + 0.5)/k quantiles, every point to its nearest centre."""
    x = np.asarray(x)
    centres = np.sort(x[((np.arange(k) + 0.5) / k * len(x)).astype(int).clip(max=len(x) - 1)])
    for _ in range(iters):
        ids = np.abs(x[:, None] - centres[None]).argmin(1)
        for j in range(k):
            if (ids == j).any():
                centres[j] = x[ids == j].mean()
        centres = np.sort(centres)
    return np.abs(x[:, None] - centres[None]).argmin(1)


def slow_loss(probs, labels, window=201, k=15, eps=1e-20):
    n, c = probs.shape
    per_class = []
    for left_out in range(c):
        rows = [i for i in range(n) if int(labels[i]) != left_out]
        events = [(probs[i, j], float(int(labels[i]) == j)) for i in rows for j in range(c)]
        events.sort(key=lambda ev: float(ev[0].detach()))
        h = window // 2
        e = []
        for i in range(len(events)):
            t = sum(events[j][0] - events[j][1] for j in range(max(0, i - h), min(len(events), i + h + 1)))
            e.append(torch.relu((t / window).abs() - eps))
        ids = slow_kmeans([float(ev[0].detach()) for ev in events], k)
        clusters = [sum((e[i] for i in range(len(e)) if ids[i] == j), torch.zeros((), dtype=probs.dtype))
                    / ((ids == j).sum() + 1e-5) for j in range(k)]
        per_class.append(torch.stack(clusters).mean())
    return torch.stack(per_class).mean() * 1e5


def test_the_loss_equals_a_slow_loop_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 4, (40,), generator=g)
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    fast = h_calibration_loss(a.softmax(1), labels, window=21, n_clusters=5)
    slow = slow_loss(b.softmax(1), labels, window=21, k=5)
    assert torch.allclose(fast, slow, rtol=1e-9)
    fast.backward()
    slow.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-7, atol=1e-12)
    whole = h_calibration_loss(z.softmax(1), labels, window=21, n_clusters=5, leave_one_class_out=False)
    assert not torch.isclose(whole, fast)  # leaving each class out changes the loss


def test_calibrated_data_score_lower_than_sharpened():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 5, generator=g, dtype=torch.float64) * 1.5
    p = z.softmax(1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)  # y ~ Cat(p): calibrated by construction
    assert 2 * h_calibration_loss(p, y) < h_calibration_loss((z / 0.5).softmax(1), y)


def test_the_map_is_monotone_from_the_identity():
    knots = torch.tensor([-5.0, -2.0, -1.0, 0.0], dtype=torch.float64)
    u = torch.linspace(-9, 1, 201, dtype=torch.float64)
    ident = torch.full((5,), float(np.log(np.e - 1)), dtype=torch.float64)
    assert torch.allclose(monotone_map(u, knots, ident, knots[0]), u)
    theta = torch.tensor([-3.0, 2.0, -1.0, 0.5, 1.0], dtype=torch.float64)
    g = monotone_map(u, knots, theta, torch.tensor(0.3, dtype=torch.float64))
    assert (g.diff() > 0).all()
    slopes = F.softplus(theta)  # below -5, on the three segments, above 0
    at = lambda v: float(monotone_map(torch.tensor([v], dtype=torch.float64), knots, theta, torch.tensor(0.3)))  # noqa: E731
    assert at(-5.0) == pytest.approx(0.3)
    for (lo, hi), slope in zip([(-9, -5), (-5, -2), (-2, -1), (-1, 0), (0, 1)], slopes.tolist()):
        assert at(hi) - at(lo) == pytest.approx(slope * (hi - lo))


@pytest.mark.parametrize("dataset", ["digits", "breast_cancer"])
def test_calibrates_naive_bayes_on_held_out_data(held_out, metrics, dataset):
    ece, nll = metrics
    z_cal, y_cal, z_te, y_te = held_out(dataset, "nb")
    cal = sdk.create("calibrator", "h_calibration").fit(z_cal, y_cal)
    p, base = cal.predict_proba(z_te), z_te.softmax(1)
    assert torch.equal(p.argmax(1), base.argmax(1))  # accuracy-preserving
    assert ece(p, y_te) < 0.6 * ece(base, y_te) and nll(p, y_te) < 0.3 * nll(base, y_te)
    if dataset == "breast_cancer":
        again = sdk.create("calibrator", "h_calibration").fit(z_cal, y_cal)
        assert torch.equal(again.theta, cal.theta)  # deterministic


def test_errors_name_the_calibrator():
    with pytest.raises(sdk.ConfigError, match="'h_calibration': window must be odd"):
        sdk.create("calibrator", "h_calibration", window=200)
    z, y = torch.randn(20, 3), torch.arange(20) % 3
    with pytest.raises(sdk.ShapeError, match="'h_calibration': fit's scores hold NaN"):
        sdk.create("calibrator", "h_calibration").fit(z.index_fill(0, torch.tensor([1]), float("nan")), y)
    with pytest.raises(sdk.NotFittedError):
        sdk.create("calibrator", "h_calibration")(z)
