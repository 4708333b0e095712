"""apre_mean_shift_outlier: APRE against torch's Gaussian NLL and a slow formula (value and
gradient), the mean shift against a slow neighbour loop, m = 0 as plain scoring, and the
measured effect on breast cancer with malignant cases subsampled to 5% as outliers."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from torch import nn

import sdk
from plugins.uncertainty.apre_mean_shift_outlier import mss_apre_score
from sdk.ood import mean_shift


def _inputs(seed=0, b=6, d=4):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(b, 2 * d, generator=g, dtype=torch.float64).requires_grad_()
    return out, torch.randn(b, d, generator=g, dtype=torch.float64)


def test_pre_is_twice_torch_gaussian_nll():
    out, x = _inputs()
    loss = sdk.create("objective", "apre_mean_shift_outlier")(sdk.Views(embeddings=(out,)), sdk.Batch(targets=x))
    mu, log_var = out[:, :4], out[:, 4:]
    ref = 2 * nn.GaussianNLLLoss()(mu, x, log_var.exp())  # eps = 1e-6 in both
    assert torch.allclose(loss.value, ref, atol=1e-12)


@pytest.mark.parametrize(("w1", "w2"), [(1.0, 1.0), (2.0, 0.5), (0.5, 0.0)])
def test_apre_value_and_gradient_equal_a_slow_loop(w1, w2):
    out, x = _inputs(1)
    obj = sdk.create("objective", "apre_mean_shift_outlier", w1=w1, w2=w2)
    loss = obj(sdk.Views(embeddings=(out,)), sdk.Batch(targets=x))
    b, d = x.shape
    slow = sum(w1 * (x[i, j] - out[i, j]) ** 2 / torch.exp(out[i, d + j]) + w2 * out[i, d + j]
               for i in range(b) for j in range(d)) / (b * d)
    assert torch.allclose(loss.value, slow, atol=1e-12)
    (g1,), (g2,) = torch.autograd.grad(loss.value, out), torch.autograd.grad(slow, out)
    assert torch.allclose(g1, g2, atol=1e-12)


def test_mean_shift_equals_a_slow_neighbour_loop_and_m_zero_is_plain_scoring():
    g = torch.Generator().manual_seed(2)
    bank, x = torch.randn(30, 3, generator=g), torch.randn(5, 3, generator=g)  # the bank is float32
    slow = x.clone()
    for _ in range(2):
        step = []
        for q in slow:
            dist = [float((q - r).pow(2).sum()) for r in bank]
            nearest = sorted(range(len(bank)), key=dist.__getitem__)[:4]
            step.append(bank[nearest].mean(0))
        slow = torch.stack(step)
    assert torch.allclose(mean_shift(bank, x, 4, 2, chunk_size=2), slow, atol=1e-5)
    model = nn.Linear(3, 6)
    plain = sdk.create("detector", "apre_mean_shift_outlier", model=model, iterations=0, k=4).fit(bank)
    mu, log_var = model(x).chunk(2, 1)
    expected = ((x - mu).pow(2) / log_var.exp() + log_var).mean(1)
    assert torch.allclose(plain.score(x), expected.detach(), atol=1e-5)
    shifted = sdk.create("detector", "apre_mean_shift_outlier", model=model, iterations=2, k=4, w1=2.0).fit(bank)
    mu, log_var = model(slow).chunk(2, 1)
    expected = (2 * (slow - mu).pow(2) / log_var.exp() + log_var).mean(1)
    assert torch.allclose(shifted.score(x), expected.detach(), atol=1e-5)
    empty = sdk.create("detector", "apre_mean_shift_outlier", iterations=0).fit(bank)  # no model
    m, v = bank.mean(0), bank.var(0, unbiased=False)
    assert torch.allclose(empty.score(x), ((x - m).pow(2) / v + v.log()).mean(1), atol=1e-5)


def test_bad_inputs_name_the_plugin_and_the_field():
    obj = sdk.create("objective", "apre_mean_shift_outlier")
    with pytest.raises(sdk.ShapeError, match=r"apre_mean_shift_outlier.*decoder output must be \[N, 2 D\]"):
        obj(sdk.Views(embeddings=(torch.randn(4, 7),)), sdk.Batch(targets=torch.randn(4, 4)))
    with pytest.raises(sdk.ShapeError, match=r"apre_mean_shift_outlier': Batch.targets must be the floating input rows"):
        obj(sdk.Views(embeddings=(torch.randn(4, 8),)), sdk.Batch(targets=torch.zeros(4, dtype=torch.long)))
    det = sdk.create("detector", "apre_mean_shift_outlier", model=nn.Linear(3, 5)).fit(torch.randn(20, 3))
    with pytest.raises(sdk.ShapeError, match=r"apre_mean_shift_outlier.*\[N, 2 D\]"):
        det.score(torch.randn(4, 3))
    with pytest.raises(sdk.ConfigError, match="w1"):
        sdk.create("objective", "apre_mean_shift_outlier", w1=0.0)


def _breast_cancer(seed):
    x, y = load_breast_cancer(return_X_y=True)  # 0 = malignant
    rng = np.random.default_rng(seed)
    benign, malignant = np.where(y == 1)[0], rng.choice(np.where(y == 0)[0], 19, replace=False)
    x = x[np.concatenate([benign, malignant])]  # 19 of 376 rows (5%) are outliers
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32), np.r_[np.zeros(len(benign)), np.ones(19)]


def _autoencoder(x, probabilistic, seed):
    torch.manual_seed(seed)
    d = x.shape[1]
    model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16),
                          nn.ReLU(), nn.Linear(16, 2 * d if probabilistic else d))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    obj = sdk.create("objective", "apre_mean_shift_outlier")
    for _ in range(300):  # unsupervised: the outliers are in the training rows
        opt.zero_grad()
        out = model(x)
        loss = obj(sdk.Views(embeddings=(out,)), sdk.Batch(targets=x)).value if probabilistic else (out - x).pow(2).mean()
        loss.backward()
        opt.step()
    return model.eval()


def test_on_breast_cancer_apre_beats_mse_and_mean_shift_scoring_beats_plain_apre():
    # measured (seeds 0, 1): MSE-AE .843/.695, APRE .932/.891, APRE+MSS .957/.957
    results = []
    for seed in range(2):
        x, outlier = _breast_cancer(seed)
        mse, pae = _autoencoder(x, False, seed), _autoencoder(x, True, seed)
        with torch.no_grad():
            results.append((roc_auc_score(outlier, (mse(x) - x).pow(2).mean(1).numpy()),
                            roc_auc_score(outlier, mss_apre_score(pae, x, x, iterations=0).numpy()),
                            roc_auc_score(outlier, sdk.create("detector", "apre_mean_shift_outlier",
                                                              model=pae).fit(x).score(x).numpy())))
    mse_auc, apre_auc, mss_auc = np.mean(results, axis=0)
    assert apre_auc > mse_auc + 0.08 and mss_auc > apre_auc + 0.02 and mss_auc > 0.94, results


def test_the_variance_is_floored_at_eps():
    x, mu = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    out = torch.cat([mu, torch.full((2, 3), -50.0, dtype=torch.float64)], 1)
    loss = sdk.create("objective", "apre_mean_shift_outlier", eps=1e-4)(sdk.Views(embeddings=(out,)), sdk.Batch(targets=x))
    assert torch.allclose(loss.value, torch.tensor(1e4 + np.log(1e-4), dtype=torch.float64))
