"""ddfa_latent_label_shift: on synthetic mixtures with known p(y|d) (Gaussian classes, domain
priors from a Dirichlet) and the exact domain posterior p(d|x), the recovered priors are within
0.05 of the truth and the latent classes are found with accuracy >= 0.9 (up to a permutation);
a trained discriminator (scikit-learn MLP) gets there too; NMF and the solve by hand."""

import itertools

import pytest
import torch

import sdk
from plugins.calibration.ddfa_latent_label_shift import anchor_factorise, solve_p_y_x


def mixture(n_per_domain=800, k=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_y_d = torch.distributions.Dirichlet(torch.full((k,), 0.5)).sample((d,)).double().T  # [K, D]
    torch.manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=torch.float64)[:k]
    domains = torch.arange(d).repeat_interleave(n_per_domain)
    y = torch.multinomial(p_y_d.T[domains], 1, generator=g).squeeze(1)
    x = means[y] + torch.randn(len(y), 2, generator=g, dtype=torch.float64)
    # the exact p(d | x) = sum_y p(d | y) p(y | x), with p(d) uniform
    lik = torch.exp(-0.5 * ((x[:, None] - means[None]) ** 2).sum(-1))  # p(x | y) up to a constant
    p_d_y = p_y_d.T / p_y_d.T.sum(0, keepdim=True)
    p_y = p_y_d.mean(1)
    post = lik * p_y
    post = post / post.sum(1, keepdim=True)
    return x, y, domains, post @ p_d_y.T, p_y_d


def best_permutation(p_hat, p_true):
    k = p_true.shape[0]
    return min(itertools.permutations(range(k)), key=lambda perm: float((p_hat[list(perm)] - p_true).abs().sum()))


def test_recovers_the_priors_and_the_latent_classes():
    x, y, domains, p_d_x, p_y_d = mixture()
    cb = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3).fit(p_d_x, domains)
    perm = list(best_permutation(cb.p_y_given_d, p_y_d))
    assert (cb.p_y_given_d[perm] - p_y_d).abs().max() < 0.05
    inv = torch.empty(3, dtype=torch.long)
    inv[torch.tensor(perm)] = torch.arange(3)
    pred = inv[cb.predict_proba(p_d_x).argmax(1)]
    assert (pred == y).double().mean() >= 0.9
    pred_d = inv[cb.predict_proba(p_d_x, domains).argmax(1)]
    assert (pred_d == y).double().mean() >= (pred == y).double().mean() - 0.01  # p(d|y) sharpens


def test_a_trained_discriminator_is_enough():
    from sklearn.neural_network import MLPClassifier
    x, y, domains, _, p_y_d = mixture(seed=1)
    clf = MLPClassifier((32,), max_iter=300, random_state=0).fit(x.numpy(), domains.numpy())
    p_d_x = torch.tensor(clf.predict_proba(x.numpy()))
    cb = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3, n_clusters=3).fit(p_d_x, domains)
    perm = list(best_permutation(cb.p_y_given_d, p_y_d))
    assert (cb.p_y_given_d[perm] - p_y_d).abs().max() < 0.1


def test_the_anchor_factorisation_and_the_solve_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 3, generator=g, dtype=torch.float64)
    a[:3] = torch.eye(3, dtype=torch.float64) * torch.rand(3, generator=g, dtype=torch.float64)  # anchors
    a[3:, :] = a[3:, :] * (1 - torch.eye(3, dtype=torch.float64)[torch.tensor([0, 1, 2, 0])]) + 0.05
    a = a / a.sum(0)
    b = torch.rand(3, 5, generator=g, dtype=torch.float64)
    b = b / b.sum(0)
    a_hat, b_hat = anchor_factorise(a @ b, 3)
    perm = list(best_permutation(b_hat, b))
    assert torch.allclose(b_hat[perm], b, atol=1e-9) and torch.allclose(a_hat[:, perm], a, atol=1e-9)
    p_d_y = torch.rand(5, 3, generator=g, dtype=torch.float64)
    p_d_y = p_d_y / p_d_y.sum(0)
    p_y_x = torch.rand(10, 3, generator=g, dtype=torch.float64)
    p_y_x = p_y_x / p_y_x.sum(1, keepdim=True)
    assert torch.allclose(solve_p_y_x(p_y_x @ p_d_y.T, p_d_y), p_y_x, atol=1e-10)  # exact when consistent


def test_the_callback_reads_the_discriminator_at_the_end_of_training():
    x, y, domains, p_d_x, p_y_d = mixture(n_per_domain=200, seed=2)

    class Trainer:
        train_loader = object()

        def embed(self, loader, with_targets=False):
            assert loader is self.train_loader and with_targets
            return p_d_x.log().float(), domains

    cb = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3)
    cb.on_fit_end(sdk.events.State(trainer=Trainer()))
    again = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3)
    again.load_state_dict(cb.state_dict())
    assert torch.equal(again.predict_proba(p_d_x), cb.predict_proba(p_d_x))

    class OneOutput(Trainer):
        def embed(self, loader, with_targets=False):
            return torch.zeros(len(domains), 1), domains

    lonely = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3)
    with pytest.warns(RuntimeWarning, match="'ddfa_latent_label_shift'.*needs at least 2 domains"):
        lonely.on_fit_end(sdk.events.State(trainer=OneOutput()))
    assert lonely.p_y_given_d is None


def test_bad_inputs_name_the_callback():
    cb = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3)
    with pytest.raises(sdk.NotFittedError, match="ddfa_latent_label_shift"):
        cb.predict_proba(torch.rand(4, 3))
    with pytest.raises(sdk.ShapeError, match="'ddfa_latent_label_shift': domains must lie in"):
        cb.fit(torch.rand(10, 3).softmax(1), torch.full((10,), 3))
    with pytest.raises(sdk.ShapeError, match="'ddfa_latent_label_shift': p\\(d \\| x\\) .* holds NaN"):
        cb.fit(torch.full((10, 3), float("nan")), torch.zeros(10, dtype=torch.long))
    with pytest.raises(sdk.ShapeError, match="n_clusters = 2 must be at least num_classes = 3"):
        sdk.create("callback", "ddfa_latent_label_shift", num_classes=3, n_clusters=2).fit(
            torch.rand(10, 3).softmax(1), torch.arange(10) % 3)


def test_bayes_rule_and_the_domain_adjustment_by_hand():
    x, y, domains, p_d_x, p_y_d = mixture(n_per_domain=100, seed=3)
    keep = (domains > 2) | (torch.arange(len(domains)) % 3 == 0)  # domains 0-2 keep a third: p(d) not uniform
    p_d_x, domains = p_d_x[keep], domains[keep]
    cb = sdk.create("callback", "ddfa_latent_label_shift", num_classes=3).fit(p_d_x, domains)
    prior = torch.bincount(domains, minlength=6).double() / len(domains)
    joint = cb.p_y_given_d * prior  # p(y, d) up to p(y): [K, D]
    p_d_y = (joint / joint.sum(1, keepdim=True)).T
    assert torch.allclose(cb.p_d_given_y(), p_d_y)
    p = solve_p_y_x(p_d_x[:5], p_d_y)
    want = p * p_d_y[domains[:5]]
    assert torch.allclose(cb.predict_proba(p_d_x[:5], domains[:5]), want / want.sum(1, keepdim=True))
