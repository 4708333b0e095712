"""adaptive_multihead_contrastive against Eq. 2.1 in the top-k form of the authors' code
(LeiWangR/cl, amcl/losses.py) written head by head, anchor by anchor and pair by pair
(float64, value and gradient)."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.adaptive_multihead_contrastive import adaptive_multihead_loss


def omega(tau, dim):
    return dim / 2 * torch.log(tau) + 1 / tau


def slow_amcl(obj, feats):
    """With the objective's own heads and temperature network: for every head and anchor, the
    mean over positives of -s/tau + beta Omega(tau), plus the mean of s/tau over the topk most
    similar negatives minus beta times the sum over them of log(tau) + 1/tau (no d'/2 factor);
    summed over heads, averaged over anchors."""
    b, v = feats[0].shape[0], len(feats)
    n = b * v
    total = 0.0
    for head in obj.heads:
        z = torch.cat([F.normalize(head(h), dim=1) for h in feats])  # row k * b + i: view k of i

        def pair(i, j, z=z):
            s = (z[i] * z[j]).sum()
            score = (obj.phi(z[i]) * obj.phi(z[j])).sum()
            tau = obj.tau_min + (obj.tau_max - obj.tau_min) / (1 + torch.exp(score))
            return s, tau

        for i in range(n):
            positives = [j for j in range(n) if j != i and j % b == i % b]
            negatives = [j for j in range(n) if j % b != i % b]
            pos = 0.0
            for p in positives:
                s, tau = pair(i, p)
                pos = pos + (-s / tau + obj.beta * omega(tau, obj.out_dim))
            ranked = sorted(negatives, key=lambda j: -float(z[i].detach() @ z[j].detach()))[:obj.topk]
            neg, reg = 0.0, 0.0
            for j in ranked:
                s, tau = pair(i, j)
                neg = neg + s / tau
                reg = reg + torch.log(tau) + 1 / tau
            total = total + pos / len(positives) + neg / len(ranked) - obj.beta * reg
    return total / n


def one_softmax_over_summed_logits(sims, taus, positive, negative, beta, dim):
    """The former (wrong) reading: all heads' logits added inside a single InfoNCE."""
    logits = (sims / taus - beta * omega(taus, dim)).sum(dim=0)
    den = torch.logsumexp(logits.masked_fill(~(positive | negative), -1e30), dim=1)
    return den - (logits * positive).sum(1) / positive.sum(1)


@pytest.mark.parametrize("n_views,num_heads,topk", [(2, 3, 1), (2, 3, 3), (3, 2, 100)])
def test_matches_slow_loop_value_and_gradient(n_views, num_heads, topk):
    torch.manual_seed(0)
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6, hidden_dim=8,
                     out_dim=4, num_heads=num_heads, beta=0.05, tau_min=0.05, tau_max=1.0,
                     topk=topk).double()
    g = torch.Generator().manual_seed(n_views)
    feats = [torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(n_views)]
    params = [*feats, *obj.parameters()]
    got = obj(sdk.Views(embeddings=tuple(feats))).value
    expected = slow_amcl(obj, feats)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected.item(), rel=1e-8)
    grads = torch.autograd.grad(got, params)
    expected_grads = torch.autograd.grad(expected, params)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-10)


def test_heads_contribute_separate_losses_not_one_softmax():
    """The loss over C heads is the sum of the C one-head losses (a sum of head-wise
    terms), which a single softmax over the heads' summed logits is not."""
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(3, 8, 4, generator=g, dtype=torch.float64), dim=-1)
    sims = z @ z.transpose(1, 2)
    taus = 0.1 + 0.5 * torch.rand(3, 8, 8, generator=g, dtype=torch.float64)
    ids = torch.arange(8) % 4
    not_self = ~torch.eye(8, dtype=torch.bool)
    pos = (ids[:, None] == ids[None, :]) & not_self
    neg = ids[:, None] != ids[None, :]
    loss, valid = adaptive_multihead_loss(sims, taus, pos, neg, beta=0.1, dim=4)
    assert valid.all()
    per_head = sum(adaptive_multihead_loss(sims[c:c + 1], taus[c:c + 1], pos, neg, beta=0.1, dim=4)[0]
                   for c in range(3))
    torch.testing.assert_close(loss, per_head, rtol=1e-12, atol=1e-12)
    old = one_softmax_over_summed_logits(sims, taus, pos, neg, 0.1, 4)
    assert (loss - old).abs().min() > 1e-3


def test_one_head_is_positive_against_most_similar_negatives():
    """Known values: the negative term takes the negatives of largest similarity (not of largest
    s/tau) with their own temperatures: mean of s/tau over the top k, beta times the sum of
    log(tau) + 1/tau over them (Omega, with d'/2, only for the positive)."""
    sims = torch.tensor([[[0.9, 0.5, 0.2, -0.3]]], dtype=torch.float64)
    taus = torch.tensor([[[0.2, 0.5, 0.1, 0.4]]], dtype=torch.float64)  # s/tau of 0.2 is the largest
    pos = torch.tensor([[True, False, False, False]])
    loss, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=0.0, dim=4, topk=1)
    assert loss.item() == pytest.approx(-0.9 / 0.2 + 0.5 / 0.5, rel=1e-12)
    loss, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=0.3, dim=4, topk=1)
    reg = 0.3 * ((2 * math.log(0.2) + 1 / 0.2) - (math.log(0.5) + 1 / 0.5))
    assert loss.item() == pytest.approx(-0.9 / 0.2 + 0.5 / 0.5 + reg, rel=1e-12)
    loss, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=0.3, dim=4, topk=2)
    reg = 0.3 * ((2 * math.log(0.2) + 1 / 0.2) - (math.log(0.5) + 1 / 0.5) - (math.log(0.1) + 1 / 0.1))
    assert loss.item() == pytest.approx(-0.9 / 0.2 + (0.5 / 0.5 + 0.2 / 0.1) / 2 + reg, rel=1e-12)
    every, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=0.3, dim=4, topk=100)
    reg = 0.3 * ((2 * math.log(0.2) + 1 / 0.2) - sum(math.log(t) + 1 / t for t in (0.5, 0.1, 0.4)))
    assert every.item() == pytest.approx(-0.9 / 0.2 + (1.0 + 2.0 - 0.75) / 3 + reg, rel=1e-12)


def test_negative_regulariser_has_no_dimension_factor():
    """Only the positive's Omega carries d'/2: changing d' moves the loss by
    beta (d'_1 - d'_2) / 2 log(tau_p), whatever the negatives' temperatures."""
    g = torch.Generator().manual_seed(4)
    sims = torch.rand(2, 3, 6, generator=g, dtype=torch.float64) * 2 - 1
    taus = 0.05 + torch.rand(2, 3, 6, generator=g, dtype=torch.float64)
    pos = torch.zeros(3, 6, dtype=torch.bool)
    pos[torch.arange(3), torch.arange(3)] = True
    for topk in (1, 3, 100):
        small, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=0.1, dim=4, topk=topk)
        large, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=0.1, dim=64, topk=topk)
        expected = 0.1 * (4 - 64) / 2 * taus[:, torch.arange(3), torch.arange(3)].log().sum(dim=0)
        torch.testing.assert_close(small - large, expected, rtol=1e-10, atol=1e-12)


def test_regulariser_sets_the_positive_temperature():
    """With zero similarity the positive pair's optimal temperature is argmin Omega = 2 / d'."""
    dim = 8
    sims = torch.tensor([0.0, 0.0, -0.5, -0.5]).view(1, 1, 4)
    log_tau = torch.tensor([math.log(0.9)], requires_grad=True)
    pos = torch.tensor([[True, False, False, False]])
    opt = torch.optim.SGD([log_tau], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        taus = torch.cat([log_tau.exp(), torch.full((3,), 0.5)]).view(1, 1, 4)  # fixed negatives
        loss, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=1.0, dim=dim)
        loss.sum().backward()
        opt.step()
    assert log_tau.exp().item() == pytest.approx(2 / dim, rel=1e-4)


@pytest.mark.parametrize("topk", [1, 2])
def test_only_the_positive_and_the_hardest_negatives_receive_gradient(topk):
    """d l / d tau_p = s_p / tau_p^2 + beta Omega'(tau_p), d l / d s_p = -1 / tau_p; for each
    of the k most similar negatives d l / d s_n = 1 / (k tau_n) and d l / d tau_n =
    -s_n / (k tau_n^2) - beta (1 / tau_n - 1 / tau_n^2); all other negatives get none."""
    dim, beta = 4, 0.2
    sims = torch.tensor([[[0.7, 0.1, 0.4, -0.2]]], dtype=torch.float64, requires_grad=True)
    taus = torch.tensor([[[0.3, 0.2, 0.6, 0.1]]], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[True, False, False, False]])
    loss, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=beta, dim=dim, topk=topk)
    d_sims, d_taus = torch.autograd.grad(loss.sum(), (sims, taus))

    def d_omega(t):
        return dim / 2 / t - 1 / t ** 2

    def d_negative(s, t):
        return -s / (topk * t ** 2) - beta * (1 / t - 1 / t ** 2)

    second = d_negative(0.1, 0.2) if topk == 2 else 0.0
    expected_taus = [0.7 / 0.3 ** 2 + beta * d_omega(0.3), second, d_negative(0.4, 0.6), 0.0]
    torch.testing.assert_close(d_taus[0, 0], torch.tensor(expected_taus, dtype=torch.float64))
    expected_sims = [-1 / 0.3, 1 / (2 * 0.2) if topk == 2 else 0.0, 1 / (topk * 0.6), 0.0]
    torch.testing.assert_close(d_sims[0, 0], torch.tensor(expected_sims, dtype=torch.float64))


def test_defaults_are_the_authors_simclr_settings():
    """beta = 1e-4 and the top 100 negatives (amcl/train.py's SimCLR defaults): the default
    objective equals one built with them, not one with every negative or beta = 0.01."""
    def build(**params):
        torch.manual_seed(0)
        return sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6, hidden_dim=8,
                          out_dim=4, num_heads=2, **params).double()

    g = torch.Generator().manual_seed(5)
    views = sdk.Views(embeddings=tuple(torch.randn(60, 6, generator=g, dtype=torch.float64)
                                       for _ in range(2)))  # 118 negatives per anchor
    default = build()(views).value
    assert default.item() == pytest.approx(build(beta=1e-4, topk=100)(views).value.item(), rel=1e-12)
    for other in (build(beta=1e-4, topk=118), build(beta=0.01, topk=100)):
        assert abs(other(views).value.item() - default.item()) > 1e-6


def test_heads_and_temperature_network_are_trainable_parameters():
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6, hidden_dim=8,
                     out_dim=4, num_heads=3)
    feats = (torch.randn(8, 6), torch.randn(8, 6))
    obj(sdk.Views(embeddings=feats)).value.backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert sum(1 for n, _ in obj.named_parameters() if n.startswith("heads.2.")) > 0


def test_bad_parameters_and_shapes():
    with pytest.raises(sdk.ConfigError, match="tau_min"):
        sdk.create("objective", "adaptive_multihead_contrastive", tau_min=2.0, tau_max=1.0)
    with pytest.raises(sdk.ConfigError, match="num_heads"):
        sdk.create("objective", "adaptive_multihead_contrastive", num_heads=0)
    with pytest.raises(sdk.ConfigError, match="topk"):
        sdk.create("objective", "adaptive_multihead_contrastive", topk=0)
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6)
    with pytest.raises(sdk.ShapeError, match=r"\[B, 6\]"):
        obj(sdk.Views(embeddings=(torch.randn(4, 5), torch.randn(4, 5))))
    with pytest.raises(sdk.ShapeError, match="masks"):
        adaptive_multihead_loss(torch.zeros(1, 3, 3), torch.ones(1, 3, 3), torch.zeros(3, 2, dtype=torch.bool),
                                torch.zeros(3, 2, dtype=torch.bool))
