"""masked_reconstruction_contrastive: the objective against an L1 over hidden patches and NT-Xent
written as loops, with SiT's uncertainty weighting (value, gradient, the analytic optimum of the
learned weights), no leak from visible patches, the fixed-weight form, defaults and errors."""

import math

import pytest
import torch

import sdk
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "masked_reconstruction_contrastive", **{
        "embed_dim": 8, "decoder_dim": 8, "decoder_heads": 2, **kw}).double()


def _inputs(b=4, seed=0):
    m = masking.random_mask(b, 16, 0.75, generator=_g(seed))
    tokens = torch.randn(b, 1 + m.ids_keep.shape[1], 8, generator=_g(seed + 1),
                         dtype=torch.float64).requires_grad_()
    second = torch.randn(b, 8, generator=_g(seed + 2), dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 3), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0], second), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, tokens, second, patches


def _nt_xent_loop(z1, z2, tau):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        den = sum(torch.exp(z[i] @ z[j] / tau) for j in range(n) if j != i)
        total = total - torch.log(torch.exp(z[i] @ z[pos] / tau) / den)
    return total / n


def _l1_hidden_loop(pred, patches, mask):
    total, count = 0.0, 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if mask[i, j] == 1:
                total = total + (pred[i, j] - patches[i, j]).abs().mean()
                count += 1
    return total / count


def test_objective_equals_l1_on_hidden_patches_and_nt_xent_with_uncertainty_weights():
    obj = _obj()
    views, batch, m, tokens, second, patches = _inputs()
    with torch.no_grad():
        obj.log_var_contrastive.fill_(0.3)
        obj.log_var_reconstruction.fill_(-0.4)
    loss = obj(views, batch)
    l_r = _l1_hidden_loop(obj.decoder(tokens, m.ids_restore), patches, m.mask)
    l_c = _nt_xent_loop(tokens[:, 0], second, 0.5)
    want = (math.exp(-0.3) * l_c + 0.15) + (0.5 * math.exp(0.4) * l_r - 0.2)
    torch.testing.assert_close(loss.value.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.logs["reconstruction"].double(), l_r.detach(), rtol=1e-6, atol=1e-9)
    params = [tokens, second, obj.decoder.pred.weight]
    got = torch.autograd.grad(loss.value, params + [obj.log_var_contrastive, obj.log_var_reconstruction])
    ref = torch.autograd.grad(want, params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-9)
    # d/ds (scale e^-s L + s/2) = -scale e^-s L + 1/2
    torch.testing.assert_close(got[3].double(), -math.exp(-0.3) * l_c.detach() + 0.5, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[4].double(), -0.5 * math.exp(0.4) * l_r.detach() + 0.5, rtol=1e-6,
                               atol=1e-9)
    assert loss.per_sample.shape == (4,)


def test_learned_weights_settle_at_their_analytic_optimum():
    """scale e^-s L + s/2 is minimal at s = log(2 scale L): the gradient vanishes there."""
    obj = _obj()
    views, batch, *_ = _inputs()
    first = obj(views, batch)
    l_c, l_r = float(first.logs["contrastive"]), float(first.logs["reconstruction"])
    with torch.no_grad():
        obj.log_var_contrastive.fill_(math.log(2 * l_c))
        obj.log_var_reconstruction.fill_(math.log(l_r))
    g = torch.autograd.grad(obj(views, batch).value, [obj.log_var_contrastive,
                                                      obj.log_var_reconstruction])
    assert all(abs(float(t)) < 1e-6 for t in g)
    # at the initial s = 0 the weights are SiT's 1 and 1/2
    fresh = _obj()
    torch.testing.assert_close(fresh(views, batch).value, first.logs["contrastive"]
                               + 0.5 * first.logs["reconstruction"])


def test_visible_patches_never_reach_the_loss_and_fixed_weights_add_the_terms():
    obj = _obj(uncertainty_weighting=False, contrastive_weight=0.3)
    assert not any("log_var" in n for n, _ in obj.named_parameters())
    views, batch, m, tokens, second, patches = _inputs()
    loss = obj(views, batch)
    torch.testing.assert_close(loss.value, loss.logs["reconstruction"] + 0.3 * loss.logs["contrastive"])
    base = loss.value.detach()
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += 1.0
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert bool(value.detach() != base) == changes


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "masked_reconstruction_contrastive")
    assert obj.temperature == 0.5 and obj.uncertainty_weighting  # the authors' code
    assert float(obj.log_var_contrastive.detach()) == 0.0 == float(obj.log_var_reconstruction.detach())
    assert obj.batch_coupled and obj.contrast.gather == "auto"
    small = _obj()
    views, batch, m, tokens, second, patches = _inputs()
    bad = {**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}
    with pytest.raises(sdk.ShapeError, match="'masked_reconstruction_contrastive'.*\\[4, 16, 4\\]"):
        small(views, batch.evolve(extras=bad))
    with pytest.raises(sdk.ShapeError, match="'masked_reconstruction_contrastive'.*saw every token"):
        small(views.evolve(extras={keys.FEATURES: (torch.randn(4, 17, 8, dtype=torch.float64),)}), batch)
    with pytest.raises(sdk.RequirementError, match="masked_reconstruction_contrastive"):
        small(sdk.Views(embeddings=(tokens[:, 0],), extras=views.extras), batch)
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        sdk.create("objective", "masked_reconstruction_contrastive", temperature=0.0)
