"""contrastive_mim: the objective against A-MIM and the contrastive InfoNCE written with
torch.distributions in loops (value and gradient), weight 0 is A-MIM alone, the analytic values
of the contrastive term (log B for identical posteriors, 0 for far-apart ones), evaluation at the
posterior mean, defaults and errors."""

import math

import pytest
import torch
from torch.distributions import Normal

import sdk
from plugins.masked.contrastive_mim import cmim_loss
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "contrastive_mim", **{
        "in_dim": 6, "embed_dim": 5, "latent_dim": 3, "decoder_hidden": (7,), **kw}).double()


def _inputs(b=4, seed=0):
    h = torch.randn(b, 5, generator=_g(seed), dtype=torch.float64).requires_grad_()
    x = torch.rand(b, 2, 3, generator=_g(seed + 1), dtype=torch.float64)
    return sdk.Views(embeddings=(h,)), sdk.Batch(extras={keys.INPUT: x}), h, x


def _slow(obj, h, x, eps, weight):
    """A-MIM and the contrastive term by loops over samples with torch.distributions."""
    b = h.shape[0]
    mean = obj.mean(h)
    log_std = 7 * torch.tanh(obj.log_std(h) / 7)
    total = 0.0
    for i in range(b):
        z = mean[i] + log_std[i].exp() * eps[i]
        q_i = Normal(mean[i], log_std[i].exp())
        x_hat = obj.decoder(z[None])[0]
        log_px = Normal(x_hat, obj.decoder_std).log_prob(x[i].flatten()).sum()
        log_pz = Normal(torch.zeros_like(z), 1.0).log_prob(z).sum()
        mim = -0.5 * (log_px + log_pz + q_i.log_prob(z).sum())
        logits = torch.stack([Normal(mean[j], log_std[j].exp()).log_prob(z).sum() for j in range(b)])
        contrastive = -(logits[i] - torch.logsumexp(logits, 0))
        total = total + mim + weight * contrastive
    return total / b


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_objective_equals_amim_plus_weighted_contrastive_by_loops(weight):
    obj = _obj(contrastive_weight=weight, decoder_std=0.5)
    views, batch, h, x = _inputs()
    torch.manual_seed(3)
    loss = obj(views, batch)
    torch.manual_seed(3)
    eps = torch.randn(4, 3, dtype=torch.float64)
    slow = _slow(obj, h, x, eps, weight)
    torch.testing.assert_close(loss.value, slow, rtol=1e-9, atol=1e-10)
    params = [h, obj.log_std.weight, obj.mean.weight, obj.decoder[0].weight]
    got = torch.autograd.grad(loss.value, params)
    want = torch.autograd.grad(slow, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    if weight == 0.0:  # the base auto-encoder loss: A-MIM alone
        torch.testing.assert_close(loss.value, loss.logs["mim"], rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(loss.value, loss.logs["mim"] + weight * loss.logs["contrastive"])


def test_contrastive_term_analytic_values():
    z = torch.randn(5, 3, generator=_g(), dtype=torch.float64)
    x = torch.zeros(5, 2, dtype=torch.float64)
    # identical posteriors: every candidate is equally likely, the term is log B
    mean, log_std = torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64)
    _, _, c = cmim_loss(x, x, z, mean, log_std)
    torch.testing.assert_close(c, torch.full((5,), math.log(5), dtype=torch.float64))
    # far-apart, narrow posteriors with each code at its own mean: the term vanishes
    mean = 10 * torch.eye(5, 3, dtype=torch.float64) + torch.arange(5.)[:, None]
    _, _, c = cmim_loss(x, x, mean, mean, torch.full((5, 3), -2.0, dtype=torch.float64))
    assert float(c.max()) < 1e-12
    # a candidate set of other ranks' rows: this batch's rows at the offset are the positives
    others = torch.randn(3, 3, generator=_g(1), dtype=torch.float64)
    both = (torch.cat([others, mean]), torch.cat([torch.zeros(3, 3), torch.full((5, 3), -2.0)]).double())
    _, _, shifted = cmim_loss(x, x, mean, mean, both[1][3:], candidates=both, offset=3)
    logits = torch.stack([torch.stack([Normal(both[0][j], both[1][j].exp()).log_prob(mean[i]).sum()
                                       for j in range(8)]) for i in range(5)])
    torch.testing.assert_close(shifted, torch.logsumexp(logits, 1) - logits[:, 3:].diagonal())


def test_evaluation_uses_the_posterior_mean_and_training_samples():
    obj = _obj()
    views, batch, h, x = _inputs()
    obj.eval()
    a, b = obj(views, batch).value, obj(views, batch).value
    assert torch.equal(a, b)
    mean, log_std = obj.encode(h)
    per, _, _ = cmim_loss(x.flatten(1), obj.decoder(mean), mean, mean, log_std)
    torch.testing.assert_close(a, per.mean())
    obj.train()
    assert not torch.equal(obj(views, batch).value, obj(views, batch).value)


def test_inputs_transform_passes_the_clean_input():
    obj = _obj()
    x = torch.rand(3, 6, dtype=torch.float64)
    out, batch = obj.inputs(x, sdk.Batch())
    assert out is x and torch.equal(batch.extras[keys.INPUT], x)


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "contrastive_mim")
    assert (obj.contrastive_weight, obj.decoder_std, obj.latent_dim, obj.in_dim) == (1.0, 1.0, 16, 64)
    assert obj.gather == "auto" and obj.batch_coupled
    small = _obj()
    views, batch, h, x = _inputs()
    with pytest.raises(sdk.ShapeError, match="'contrastive_mim'.*embed_dim"):
        small(sdk.Views(embeddings=(torch.randn(4, 9, dtype=torch.float64),)), batch)
    with pytest.raises(sdk.ShapeError, match="'contrastive_mim'.*'input'.*6 values"):
        small(views, sdk.Batch(extras={keys.INPUT: torch.rand(4, 5, dtype=torch.float64)}))
    with pytest.raises(sdk.ConfigError, match="decoder_std must be > 0"):
        sdk.create("objective", "contrastive_mim", decoder_std=0.0)
    with pytest.raises(sdk.ConfigError, match="contrastive_weight must be >= 0"):
        sdk.create("objective", "contrastive_mim", contrastive_weight=-1.0)
