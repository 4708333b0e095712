"""decoupled_contrastive against an anchor-by-anchor loop of DCL / DCLW (Yeh et al., eq. 6 and 8)."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.decoupled_contrastive import decoupled_contrastive_loss
from plugins.contrastive.nt_xent import nt_xent_loss


def slow_dcl(views, labels, t, sigma=None):
    """Float64 DCL written per anchor: -mean_p w_p s_p / t + log sum_{k: other label} exp(s_k / t).

    DCLW's w_p = 2 - exp(s_p / sigma) / mean over every (ordered) positive pair of exp(s / sigma),
    taken as a constant."""
    z = torch.cat([F.normalize(v.double(), dim=1) for v in views])
    y = list(labels) * len(views)
    n = len(y)
    pos = [[k for k in range(n) if k != i and y[k] == y[i]] for i in range(n)]
    if sigma is None:
        def w(i, p):
            return 1.0
    else:
        e = {(i, p): math.exp((z[i] @ z[p]).item() / sigma) for i in range(n) for p in pos[i]}
        mean_e = sum(e.values()) / len(e)

        def w(i, p):
            return 2.0 - e[(i, p)] / mean_e
    total = 0.0
    for i in range(n):
        neg = torch.stack([z[i] @ z[k] / t for k in range(n) if y[k] != y[i]])
        attract = sum(w(i, p) * (z[i] @ z[p]) / t for p in pos[i]) / len(pos[i])
        total = total - attract + torch.log(torch.exp(neg).sum())
    return total / n


def _views(n_views, b=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(n_views)]


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("sigma", [None, 0.5])
def test_value_and_gradient_match_loop(n_views, sigma):
    views = _views(n_views, seed=n_views)
    expected = slow_dcl(views, range(6), 0.1, sigma)
    want = torch.autograd.grad(expected, views)
    got = decoupled_contrastive_loss(*views, sigma=sigma)  # paper default temperature 0.1
    grads = torch.autograd.grad(got, views)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for g_got, g_want in zip(grads, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma", [None, 0.3])
def test_label_positives_sampler_matches_loop(sigma):
    views = _views(2, b=8, d=5, seed=7)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    obj = sdk.create("objective", "decoupled_contrastive", temperature=0.2, sigma=sigma,
                     sampler=sdk.create("sampler", "label_positives"))
    got = obj(sdk.Views(embeddings=tuple(views)), sdk.Batch(targets=labels)).value
    expected = slow_dcl(views, labels.tolist(), 0.2, sigma)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    grads, want = torch.autograd.grad(got, views), torch.autograd.grad(expected, views)
    for g_got, g_want in zip(grads, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_same_index_sampler_equals_default_path():
    views = [v.detach().float() for v in _views(3, seed=11)]
    for sigma in (None, 0.5):
        explicit = decoupled_contrastive_loss(*views, sigma=sigma, sampler=sdk.create("sampler", "same_index"))
        assert torch.allclose(explicit, decoupled_contrastive_loss(*views, sigma=sigma), rtol=1e-5)


def test_infonce_minus_dcl_is_the_coupling_term():
    """Paper eq. 5: L_InfoNCE,i - L_DCL,i = log(1 + exp(s_ip/t) / sum_{k in N(i)} exp(s_ik/t))."""
    z1, z2 = (v.detach().float() for v in _views(2, b=10, d=6, seed=3))
    t = 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    s = z @ z.T / t
    n = 10
    partner = (torch.arange(2 * n) + n) % (2 * n)
    excluded = torch.eye(2 * n, dtype=torch.bool)
    excluded[torch.arange(2 * n), partner] = True
    log_neg = torch.logsumexp(s.masked_fill(excluded, -math.inf), dim=1)
    coupling = torch.log1p(torch.exp(s[torch.arange(2 * n), partner] - log_neg)).mean()
    gap = nt_xent_loss(z1, z2, temperature=t) - decoupled_contrastive_loss(z1, z2, temperature=t)
    assert gap.item() == pytest.approx(coupling.item(), rel=1e-5)


def test_positive_gradient_is_minus_one_over_t():
    """Paper sec. 3: dL_DCL,i/ds_ip = -1/t whatever the negatives; InfoNCE's is -(1 - p_ip)/t."""
    t = 0.1
    g = torch.Generator().manual_seed(5)
    sims = (2 * torch.rand(4, 7, generator=g) - 1).requires_grad_()
    positive = torch.zeros(4, 7, dtype=torch.bool)
    positive[torch.arange(4), torch.arange(4)] = True
    dcl, _ = sdk.contrastive.info_nce(sims / t, positive, ~positive, positive_in_denominator=False)
    nce, _ = sdk.contrastive.info_nce(sims / t, positive, ~positive)
    (g_dcl,) = torch.autograd.grad(dcl.sum(), sims)
    (g_nce,) = torch.autograd.grad(nce.sum(), sims)
    torch.testing.assert_close(g_dcl[positive], torch.full((4,), -1 / t))
    p = torch.softmax(sims.detach() / t, dim=1)[positive]
    torch.testing.assert_close(g_nce[positive], -(1 - p) / t)


def test_per_sample_averages_views():
    views = [v.detach().float() for v in _views(3, seed=13)]
    loss = sdk.create("objective", "decoupled_contrastive", sigma=0.5)(sdk.Views(embeddings=tuple(views)))
    assert loss.per_sample.shape == (6,)
    torch.testing.assert_close(loss.per_sample.mean(), loss.value)


def test_dclw_weight_is_detached_and_averages_to_one():
    from plugins.contrastive.decoupled_contrastive import von_mises_fisher_weight

    s = torch.tensor([0.9, 0.1, -0.4, 0.5], requires_grad=True)
    w = von_mises_fisher_weight(s, 0.5)
    assert not w.requires_grad
    torch.testing.assert_close(w, 2 - 4 * torch.softmax(s.detach() / 0.5, dim=0))
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))


def test_dclw_differs_from_dcl_and_gather_single_process_is_identity():
    views = [v.detach().float() for v in _views(2, seed=17)]
    dcl = decoupled_contrastive_loss(*views)
    assert abs(decoupled_contrastive_loss(*views, sigma=0.5).item() - dcl.item()) > 1e-4
    assert torch.allclose(decoupled_contrastive_loss(*views, gather=True), dcl)


def test_no_nan_gradient_without_any_positive():
    class NoPositives(sdk.interfaces.Sampler):
        def pairs(self, views, batch):
            n = views.n_views * views.batch_size
            return sdk.Pairs(positive=torch.zeros(n, n, dtype=torch.bool),
                             negative=~torch.eye(n, dtype=torch.bool))

    z1 = torch.randn(4, 3, requires_grad=True)
    loss = decoupled_contrastive_loss(z1, torch.randn(4, 3), sigma=0.5, sampler=NoPositives())
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("param,value", [("temperature", 0.0), ("temperature", -1.0), ("sigma", 0.0),
                                         ("sigma", -0.5)])
def test_bad_parameters_name_the_field(param, value):
    with pytest.raises(sdk.ConfigError, match=param):
        sdk.create("objective", "decoupled_contrastive", **{param: value})


def test_one_view_is_rejected():
    obj = sdk.create("objective", "decoupled_contrastive")
    with pytest.raises(sdk.RequirementError, match="views"):
        obj(sdk.Views(embeddings=(torch.randn(4, 3),)))
