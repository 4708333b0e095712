"""adaptive_multihead_contrastive against an explicit loop over heads, anchors and pairs."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.adaptive_multihead_contrastive import adaptive_multihead_loss
from plugins.nt_xent import nt_xent_loss


def omega(tau, dim):
    return dim / 2 * math.log(tau) + 1 / tau


def slow_amcl(obj, feats):
    """AMCL written pair by pair with the objective's own heads and temperature network."""
    b, v = feats[0].shape[0], len(feats)
    heads = []
    for head in obj.heads:
        z = [F.normalize(head(h), dim=1) for h in feats]
        heads.append([z[k][i] for k in range(v) for i in range(b)])
    n = b * v
    total = 0.0
    for i in range(n):
        logit = []
        for j in range(n):
            value = 0.0
            for z in heads:
                s = float(z[i] @ z[j])
                score = float(obj.phi(z[i]) @ obj.phi(z[j]))
                tau = obj.tau_min + (obj.tau_max - obj.tau_min) / (1 + math.exp(score))
                value += s / tau - obj.beta * omega(tau, obj.out_dim)
            logit.append(value)
        m = max(logit[j] for j in range(n) if j != i)
        log_den = m + math.log(sum(math.exp(logit[j] - m) for j in range(n) if j != i))
        positives = [j for j in range(n) if j != i and j % b == i % b]
        total += sum(log_den - logit[p] for p in positives) / len(positives)
    return total / n


@pytest.mark.parametrize("n_views,num_heads", [(2, 3), (3, 2)])
def test_matches_slow_loop(n_views, num_heads):
    torch.manual_seed(0)
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6, hidden_dim=8,
                     out_dim=4, num_heads=num_heads, beta=0.05, tau_min=0.05, tau_max=1.0).eval()
    g = torch.Generator().manual_seed(n_views)
    feats = [torch.randn(5, 6, generator=g) for _ in range(n_views)]
    got = obj(sdk.Views(embeddings=tuple(feats))).value
    with torch.no_grad():
        expected = slow_amcl(obj, feats)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_one_head_fixed_temperature_no_regulariser_is_nt_xent():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sims = (z @ z.T)[None]
    ids = torch.arange(12) % 6
    not_self = ~torch.eye(12, dtype=torch.bool)
    pos = (ids[:, None] == ids[None, :]) & not_self
    loss, valid = adaptive_multihead_loss(sims, torch.full_like(sims, 0.3), pos, ~pos & not_self,
                                          beta=0.0, dim=4)
    assert loss[valid].mean().item() == pytest.approx(nt_xent_loss(z1, z2, temperature=0.3).item(),
                                                      rel=1e-5)


def test_regulariser_sets_the_positive_temperature():
    """With zero similarity the positive pair's optimal temperature is argmin Omega = 2 / d',
    and a negative pair's temperature is pushed away from it (its Omega raised)."""
    dim = 8
    sims = torch.zeros(1, 1, 4)
    log_tau = torch.tensor([math.log(0.9), math.log(0.3)], requires_grad=True)
    pos = torch.tensor([[True, False, False, False]])
    opt = torch.optim.SGD([log_tau], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        taus = torch.cat([log_tau.exp(), torch.ones(2)]).view(1, 1, 4)  # two fixed negatives
        loss, _ = adaptive_multihead_loss(sims, taus, pos, ~pos, beta=1.0, dim=dim)
        loss.sum().backward()
        opt.step()
    tau = log_tau.exp().detach()
    assert tau[0].item() == pytest.approx(2 / dim, rel=1e-4)
    assert tau[1].item() > 0.6


def test_gradient_moves_the_temperature_network_per_the_regulariser():
    """Positive pairs sit below Omega's minimum: a step must raise their temperatures."""
    torch.manual_seed(0)
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6, hidden_dim=8,
                     out_dim=4, num_heads=2, beta=10.0, tau_min=0.01, tau_max=0.2)
    x = torch.randn(8, 6)
    views = sdk.Views(embeddings=(x, x + 0.1 * torch.randn(8, 6)))
    before = obj(views).logs["tau_positive"]
    opt = torch.optim.SGD(obj.phi.parameters(), lr=0.05)
    for _ in range(8):
        opt.zero_grad()
        obj(views).value.backward()
        opt.step()
    assert obj(views).logs["tau_positive"] > before  # 2/d' = 0.5 lies above tau_max


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
    obj = sdk.create("objective", "adaptive_multihead_contrastive", in_dim=6)
    with pytest.raises(sdk.ShapeError, match=r"\[B, 6\]"):
        obj(sdk.Views(embeddings=(torch.randn(4, 5), torch.randn(4, 5))))
