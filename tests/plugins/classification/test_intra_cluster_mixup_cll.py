"""intra_cluster_mixup_cll: SCL-NL / SCL-EXP against a loop, in-cluster partners, the analytic
complementary-label noise rate of random pairing, and ICM beating plain mixup on digits."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import sdk
from plugins.classification.intra_cluster_mixup_cll import cluster_partners, noise_rate, random_partners


def slow_scl(z, q, kind):
    rows = []
    for i in range(z.shape[0]):
        total = 0.0
        den = sum(torch.exp(z[i, k]) for k in range(z.shape[1]))
        for k in range(z.shape[1]):
            p = torch.exp(z[i, k]) / den
            total = total + q[i, k] * (-torch.log(1 - p) if kind == "nl" else torch.exp(p))
        rows.append(total)
    return torch.stack(rows)


def grads(f, z):
    z = z.clone().requires_grad_()
    value = f(z)
    return value.detach(), torch.autograd.grad(value.sum(), z)[0]


@pytest.mark.parametrize("kind", ["nl", "exp"])
def test_scl_losses_match_loop_for_ids_and_mixtures(kind):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    ybar = torch.tensor([1, 0, 3, 2, 2, 0])
    obj = sdk.create("objective", "intra_cluster_mixup_cll", loss=kind)
    got, got_g = grads(lambda t: obj(sdk.Views(logits=t), sdk.Batch(targets=ybar)).per_sample, z)
    want, want_g = grads(lambda t: slow_scl(t, F.one_hot(ybar, 4).double(), kind), z)
    assert torch.allclose(got, want, rtol=1e-10) and torch.allclose(got_g, want_g, rtol=1e-9)
    # a mixture is the lam-weighted sum of the two complementary labels' losses (the code's form)
    lam, j = 0.3, torch.tensor([2, 2, 0, 5, 1, 3])
    q = lam * F.one_hot(ybar, 4).double() + (1 - lam) * F.one_hot(ybar[j], 4).double()
    mixed = obj(sdk.Views(logits=z), sdk.Batch(targets=q)).per_sample
    pair = lam * got + (1 - lam) * obj(sdk.Views(logits=z), sdk.Batch(targets=ybar[j])).per_sample
    assert torch.allclose(mixed, pair, rtol=1e-12)


def test_scl_nl_is_accurate_where_the_complementary_class_is_almost_certain():
    z = torch.tensor([[30.0, 0.0, 0.0], [-30.0, 0.0, 0.0]])
    loss = sdk.create("objective", "intra_cluster_mixup_cll")(
        sdk.Views(logits=z), sdk.Batch(targets=torch.tensor([0, 0]))).per_sample
    # -log(1 - p0) = log(1 + e^30 / 2) and -log1p(-e^-30 / (e^-30 + 2))
    assert loss[0].item() == pytest.approx(30 - torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert loss[1].item() == pytest.approx(torch.exp(torch.tensor(-30.0)).item() / 2, rel=1e-4)


def test_partners_share_the_cluster_and_are_uniform_within_it():
    torch.manual_seed(0)
    clusters = torch.tensor([0, 1, 0, 2, 1, 0])
    counts = torch.zeros(6, 6)
    for _ in range(3000):
        j = cluster_partners(clusters)
        counts[torch.arange(6), j] += 1
    same = clusters[:, None] == clusters[None, :]
    assert counts[~same].sum() == 0
    assert counts[3, 3] == 3000  # alone in its cluster: its own partner
    freq = counts[0, [0, 2, 5]] / 3000  # cluster 0 has 3 members, the sample itself included
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)


def test_random_pairing_noise_rate_is_analytic_and_clusters_lower_it():
    torch.manual_seed(1)
    c, b = 10, 200_000
    y = torch.randint(c, (b,))
    ybar = (y + torch.randint(1, c, (b,))) % c  # uniform complementary labels
    rate = noise_rate(ybar, y, random_partners(b, y.device))
    analytic = (c - 1) / c * (1 - (1 - 1 / (c - 1)) ** 2) * (1 - 1 / b)  # a self-pair has no noise
    assert abs(rate.item() - analytic) < 0.01
    X, labels = load_digits(return_X_y=True)
    X, labels = torch.tensor(X, dtype=torch.float32), torch.tensor(labels)
    ybar = (labels + torch.randint(1, c, labels.shape)) % c
    icm = sdk.create("transform", "intra_cluster_mixup_cll", num_classes=c)
    clusters = icm.cluster(X)
    assert noise_rate(ybar, labels, cluster_partners(clusters)) < 0.7 * analytic


def test_transform_mixes_inputs_and_labels_with_in_cluster_partners_and_resumes():
    torch.manual_seed(2)
    x = torch.randn(8, 3)
    emb = torch.cat([torch.zeros(4, 2), 10 + torch.zeros(4, 2)]) + 0.01 * torch.randn(8, 2)
    icm = sdk.create("transform", "intra_cluster_mixup_cll", num_classes=4, n_clusters=2)
    index = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    icm.cluster(emb, index)
    ybar = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    batch = sdk.Batch(targets=ybar, index=torch.arange(8))
    out, mixed = icm(x, batch)
    lam, j = mixed.extras["mixup_lambda"], mixed.extras["mixup_perm"]
    group = (torch.arange(8) < 4)  # index 7..4 are the first cluster: batch samples 0..3 are 4..7
    assert torch.equal(group[j], group)
    assert torch.allclose(out, lam * x + (1 - lam) * x[j])
    assert torch.allclose(mixed.targets, lam * F.one_hot(ybar, 4) + (1 - lam) * F.one_hot(ybar[j], 4))
    fresh = sdk.create("transform", "intra_cluster_mixup_cll", num_classes=4, n_clusters=2)
    fresh.load_state_dict(icm.state_dict())
    assert torch.equal(fresh.clusters, icm.clusters)
    given = icm(x, sdk.Batch(targets=ybar, extras={"cluster": torch.arange(8)}))[1]
    assert torch.equal(given.extras["mixup_perm"], torch.arange(8))  # every sample alone
    unknown = icm(x[:3], sdk.Batch(targets=ybar[:3], index=torch.tensor([20, 21, 22])))[1]
    assert torch.equal(unknown.extras["mixup_perm"], torch.arange(3))  # not clustered: alone
    assert icm.eval()(x, batch)[0] is x


def test_default_mixing_weight_is_uniform():
    # alpha = 1 (the default): lam ~ Beta(1, 1), uniform on (0, 1); a Kolmogorov-Smirnov test
    # over 2000 batches (alpha = 2 or 0.5 gives a statistic above 0.1, this one about 0.01)
    from scipy.stats import kstest

    torch.manual_seed(0)
    icm = sdk.create("transform", "intra_cluster_mixup_cll", num_classes=3)
    x, batch = torch.randn(4, 2), sdk.Batch(targets=torch.tensor([0, 1, 2, 0]),
                                            extras={"cluster": torch.tensor([0, 0, 1, 1])})
    lams = torch.stack([icm(x, batch)[1].extras["mixup_lambda"] for _ in range(2000)])
    assert kstest(lams.numpy(), "uniform").statistic < 0.03


def _digits_accuracy(pairing, seed, epochs=8):
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = order[:1200], order[1200:]
    torch.manual_seed(seed)
    ybar = (y + torch.randint(1, 10, y.shape)) % 10
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    obj = sdk.create("objective", "intra_cluster_mixup_cll")
    mix = sdk.create("transform", "intra_cluster_mixup_cll", num_classes=10, pairing=pairing, seed=seed)
    mix.cluster(X[tr], tr)  # pixels stand in for the paper's SimSiam embeddings
    for _ in range(epochs):
        shuffled = tr[torch.randperm(len(tr))]
        for idx in shuffled.split(128):
            xb, b = mix(X[idx], sdk.Batch(targets=ybar[idx], index=idx))
            loss = obj(sdk.Views(logits=model(xb)), b).value
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(X[te]).argmax(1) == y[te]).float().mean().item()


def test_icm_beats_plain_mixup_on_digits_with_complementary_labels():
    icm = sum(_digits_accuracy("cluster", s) for s in range(3)) / 3
    plain = sum(_digits_accuracy("random", s) for s in range(3)) / 3
    assert icm >= plain + 0.03, (icm, plain)


def test_errors():
    x = torch.randn(4, 2)
    icm = sdk.create("transform", "intra_cluster_mixup_cll", num_classes=3)
    with pytest.raises(sdk.RequirementError, match="needs cluster ids"):
        icm(x, sdk.Batch(targets=torch.tensor([0, 1, 2, 0])))
    with pytest.raises(sdk.ShapeError, match=r"Batch.extras\['cluster'\] must be \[4\]"):
        icm(x, sdk.Batch(targets=torch.tensor([0, 1, 2, 0]), extras={"cluster": torch.zeros(3)}))
    with pytest.raises(sdk.RequirementError, match="needs Batch.targets"):
        icm(x, sdk.Batch(extras={"cluster": torch.zeros(4)}))
    with pytest.raises(sdk.ConfigError, match="needs n_clusters= or num_classes="):
        sdk.create("transform", "intra_cluster_mixup_cll").cluster(x)
    with pytest.raises(sdk.ConfigError, match="pairing"):
        sdk.create("transform", "intra_cluster_mixup_cll", pairing="nearest")
    with pytest.raises(sdk.ShapeError, match="soft labels must sum to 1"):
        sdk.create("objective", "intra_cluster_mixup_cll")(
            sdk.Views(logits=torch.zeros(2, 3)), sdk.Batch(targets=torch.full((2, 3), 0.5)))
