"""rcal_gaussian_feature_sampling: sampled features have the requested means and covariances;
the robust moments and the tail calibration equal slow loops and ignore planted mislabelled
rows; on long-tailed digits with 20% symmetric label noise, retraining the head on sampled and
real features raises the balanced accuracy over the plain head; bad input is refused by name."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

import sdk
from plugins.calibration.rcal_gaussian_feature_sampling import (
    calibrate_tails,
    robust_moments,
    sample_features,
)
from sdk.calibration import fit_linear_head


def test_sampled_features_have_the_estimated_moments():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    x, ids = sample_features(means, covs, 20000, torch.Generator().manual_seed(1))
    assert torch.equal(ids, torch.arange(3).repeat_interleave(20000))
    for c in range(3):
        rows = x[ids == c]
        torch.testing.assert_close(rows.mean(0), means[c], atol=0.06, rtol=0)
        torch.testing.assert_close(torch.cov(rows.T), covs[c], atol=0.1, rtol=0.05)


def slow_moments(x, labels, c, trim):
    rows = x[labels == c].numpy()
    med = np.median(rows, axis=0)
    order = sorted(range(len(rows)), key=lambda i: float(np.linalg.norm(rows[i] - med)))
    keep = rows[order[: len(rows) - int(trim * len(rows))]]
    return keep.mean(0), np.cov(keep.T, ddof=1)


def test_robust_moments_equal_a_slow_loop_and_ignore_mislabelled_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    labels = torch.arange(200) % 2
    x[labels == 0] += 5
    x[(labels == 1).nonzero()[:9, 0]] = torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64)  # 9 rows of class 0 mislabelled 1
    means, covs, counts = robust_moments(x, labels, 2, trim=0.1)
    assert counts.tolist() == [100, 100]
    for c in range(2):
        mu, cov = slow_moments(x, labels, c, 0.1)
        torch.testing.assert_close(means[c], torch.tensor(mu))
        torch.testing.assert_close(covs[c], torch.tensor(cov))
    assert float(means[1].abs().max()) < 0.3  # the mislabelled rows are trimmed
    assert float(x[labels == 1].mean(0).abs().max()) > 0.3  # the plain mean is pulled to them


def test_tail_covariances_equal_a_slow_loop():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(5, 2, generator=g, dtype=torch.float64) * 3
    covs = torch.stack([torch.eye(2, dtype=torch.float64) * (i + 1) for i in range(5)])
    counts = torch.tensor([50, 40, 30, 5, 3])  # head: >= the mean count 25.6
    out = calibrate_tails(means, covs, counts, neighbours=2, alpha=0.2)
    for c in range(5):
        if c < 3:
            expected = covs[c]
        else:
            dist = [float(torch.dist(means[c], means[h])) for h in range(3)]
            near = sorted(range(3), key=lambda h: dist[h])[:2]
            expected = (covs[c] + sum(covs[h] for h in near)) / 3 + 0.2 * torch.eye(2, dtype=torch.float64)
        torch.testing.assert_close(out[c], expected)


def long_tailed_noisy_digits():
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    pca = PCA(20, random_state=0).fit(x_tr)
    scale = pca.transform(x_tr).std(0)
    f_tr, f_te = pca.transform(x_tr) / scale, pca.transform(x_te) / scale
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(y_tr == c), round(100 * 0.05 ** (c / 9)), replace=False)
                          for c in range(10)])  # 100 ... 5 rows per class (imbalance 20)
    noisy = y_tr[idx].copy()
    flip = rng.random(len(noisy)) < 0.2  # symmetric noise: 20% of labels redrawn uniformly
    noisy[flip] = rng.integers(0, 10, int(flip.sum()))
    return (torch.tensor(f_tr[idx]), torch.tensor(noisy), torch.tensor(f_te), torch.tensor(y_te))


def balanced_accuracy(pred, y):
    return float(np.mean([float((pred[y == c] == c).double().mean()) for c in range(10)]))


def test_retraining_on_calibrated_samples_raises_balanced_accuracy():
    x, y, x_test, y_test = long_tailed_noisy_digits()
    cal = sdk.create("calibrator", "rcal_gaussian_feature_sampling")
    assert (cal.samples_per_class, cal.trim, cal.neighbours, cal.alpha) == (200, 0.1, 2, 0.2)
    rcal = balanced_accuracy(cal.fit(x, y)(x_test).argmax(1), y_test)
    plain = sdk.create("calibrator", "rcal_gaussian_feature_sampling", samples_per_class=0).fit(x, y)
    base = balanced_accuracy(plain(x_test).argmax(1), y_test)
    assert rcal > base + 0.06, (rcal, base)
    assert cal.predict_proba(x_test).sum(1).allclose(torch.ones(len(x_test), dtype=torch.float64))


def test_bad_input_is_refused_by_name():
    x, y = torch.randn(40, 3), torch.arange(40) % 4
    cal = sdk.create("calibrator", "rcal_gaussian_feature_sampling", num_classes=4, max_iter=5)
    with pytest.raises(sdk.ShapeError, match=r"rcal_gaussian_feature_sampling.*\[0, 4\)"):
        cal.fit(x, y + 1)
    with pytest.raises(sdk.ShapeError, match="rcal_gaussian_feature_sampling.*at least 2 labelled rows"):
        cal.fit(x[:5], y[:5])
    with pytest.raises(sdk.NotFittedError, match="rcal_gaussian_feature_sampling"):
        cal(x)
    with pytest.raises(TypeError, match="rcal_gaussian_feature_sampling"):
        cal.fit(sdk.Logits(x), y)
    cal.fit(x, y)
    assert cal(x).shape == (40, 4)
    with pytest.raises(sdk.ShapeError, match="rcal_gaussian_feature_sampling.*fitted on 3"):
        cal(x[:, :2])


def test_fit_retrains_on_real_and_calibrated_samples():
    x, y = long_tailed_noisy_digits()[:2]
    cal = sdk.create("calibrator", "rcal_gaussian_feature_sampling", samples_per_class=50, seed=3).fit(x, y)
    means, covs, counts = robust_moments(x, y, 10, 0.1)
    covs = calibrate_tails(means, covs, counts, 2, 0.2)
    torch.testing.assert_close(cal.covariances, covs)
    sampled, ids = sample_features(means, covs, 50, torch.Generator().manual_seed(3))
    weight, bias = fit_linear_head(torch.cat([x, sampled]), torch.cat([y, ids]), 10, weight_decay=1e-3)
    torch.testing.assert_close(cal.weight, weight)
    torch.testing.assert_close(cal.bias, bias)
