"""augmentation_aware_discriminator (AugSelf-GAN): both players' losses against plain loops over
samples and augmentation groups (value and gradient), the plain GAN loss at weight 0, the sign
convention on an exact predictor (analytic), the generator's indifference to real rows, defaults
and errors."""

import math

import pytest
import torch

import sdk
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "augmentation_aware_discriminator",
                      **{"embed_dim": 4, **kw}).double()


def _inputs(b=6, d=4, p=7, seed=0):
    g = _g(seed)
    h = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    h_aug = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    params = torch.rand(b, p, generator=g, dtype=torch.float64)
    generated = torch.tensor([0, 1, 1, 0, 1, 0][:b], dtype=torch.bool)
    views = sdk.Views(embeddings=(h, h_aug))
    batch = sdk.Batch(extras={keys.AUGMENTATION_PARAMS: params, keys.GENERATED: generated})
    return views, batch, h, h_aug, params, generated


def _group_mse(pred, target, groups):
    total, start = 0.0, 0
    for n in groups:
        total = total + sum((pred[k] - target[k]) ** 2 for k in range(start, start + n)) / n
        start += n
    return total


def _slow(obj, h, h_aug, params, generated, player, groups=(3, 2, 2), lam=1.0):
    total = 0.0
    for i in range(h.shape[0]):
        logit = obj.adversarial(h_aug[i])[0]
        pred = obj.augmentation(h_aug[i] - h[i])
        w = params[i]
        fake = bool(generated[i])
        if player == "discriminator":
            if fake:
                term = -torch.log(1 - torch.sigmoid(logit)) + lam * _group_mse(pred, -w, groups)
            else:
                term = -torch.log(torch.sigmoid(logit)) + lam * _group_mse(pred, w, groups)
        else:
            term = (-torch.log(torch.sigmoid(logit))
                    + lam * (_group_mse(pred, w, groups) - _group_mse(pred, -w, groups))) if fake else 0.0
        total = total + term
    return total / h.shape[0]


@pytest.mark.parametrize("player", ["discriminator", "generator"])
def test_both_players_equal_loops_over_samples_and_groups(player):
    lam = 0.7
    weight = "discriminator_weight" if player == "discriminator" else "generator_weight"
    obj = _obj(player=player, **{weight: lam})
    views, batch, h, h_aug, params, generated = _inputs()
    loss = obj(views, batch)
    slow = _slow(obj, h, h_aug, params, generated, player, lam=lam)
    torch.testing.assert_close(loss.value, slow, rtol=1e-10, atol=1e-12)
    leaves = [h, h_aug, obj.adversarial.weight, obj.augmentation.weight, obj.augmentation.bias]
    for a, b in zip(torch.autograd.grad(loss.value, leaves), torch.autograd.grad(slow, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_weight_zero_is_the_plain_non_saturating_gan_loss():
    views, batch, h, h_aug, params, generated = _inputs()
    d = _obj(discriminator_weight=0.0)
    logits = d.adversarial(h_aug).squeeze(1)
    fake = generated.double()
    expected = (torch.nn.functional.softplus(-logits) * (1 - fake)
                + torch.nn.functional.softplus(logits) * fake).mean()
    torch.testing.assert_close(d(views, batch).value, expected)
    g = _obj(generator_weight=0.0, player="generator")
    torch.testing.assert_close(g(views, batch).value,
                               (torch.nn.functional.softplus(-logits) * fake).mean())


def test_sign_convention_on_an_exact_predictor():
    """phi = identity and h(T(x)) - h(x) = w: real rows are predicted exactly (no error), a
    generated row misses its target -w by 2w; the generator's term is mse(w, w) - mse(w, -w)."""
    p, groups = 4, (3, 1)
    params = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.5, 0.1, 0.3, 0.9]], dtype=torch.float64)
    generated = torch.tensor([False, True])
    h = torch.zeros(2, p, dtype=torch.float64)
    views = sdk.Views(embeddings=(h, params.clone()))
    batch = sdk.Batch(extras={keys.AUGMENTATION_PARAMS: params, keys.GENERATED: generated})
    for player in ("discriminator", "generator"):
        obj = _obj(embed_dim=p, groups=groups, player=player)
        with torch.no_grad():
            obj.augmentation.weight.copy_(torch.eye(p))
            obj.augmentation.bias.zero_()
            obj.adversarial.weight.zero_()
            obj.adversarial.bias.zero_()
        value = obj(views, batch).value
        w = params[1]
        miss = float((2 * w[:3]).pow(2).mean() + (2 * w[3]) ** 2)  # grouped mse(w, -w)
        if player == "discriminator":
            expected = (2 * math.log(2) + miss) / 2  # softplus(0) on both rows, error on row 1 only
        else:
            expected = (math.log(2) - miss) / 2  # only the generated row counts
        assert abs(float(value.detach()) - expected) < 1e-12


def test_generator_loss_ignores_real_rows():
    obj = _obj(player="generator")
    views, batch, h, h_aug, params, generated = _inputs()
    base = obj(views, batch).value
    gh, gha = torch.autograd.grad(base, [h, h_aug])
    assert gh[~generated].abs().sum() == 0 and gha[~generated].abs().sum() == 0
    assert gh[generated].abs().sum() > 0
    moved = h_aug.detach().clone()
    moved[~generated] += 3.0
    other = obj(sdk.Views(embeddings=(h, moved)), batch).value
    torch.testing.assert_close(other, base)
    moved[generated] += 3.0  # and the generated rows do count
    assert float((obj(sdk.Views(embeddings=(h, moved)), batch).value - base).abs().detach()) > 1e-3


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "augmentation_aware_discriminator")
    assert (obj.groups, obj.param_dim, obj.player) == ((3, 2, 2), 7, "discriminator")
    assert (obj.discriminator_weight, obj.generator_weight, obj.embed_dim) == (1.0, 1.0, 128)
    small = _obj()
    views, batch, *_ = _inputs()
    with pytest.raises(sdk.ShapeError, match="'augmentation_aware_discriminator'.*\\[6, 7\\]"):
        small(views, batch.evolve(extras={**batch.extras,
                                          keys.AUGMENTATION_PARAMS: torch.rand(6, 5).double()}))
    with pytest.raises(sdk.ShapeError, match="'augmentation_aware_discriminator'.*'generated'"):
        small(views, batch.evolve(extras={**batch.extras, keys.GENERATED: torch.rand(6)}))
    with pytest.raises(sdk.ShapeError, match="'augmentation_aware_discriminator'.*\\[B, 4\\]"):
        small(sdk.Views(embeddings=(torch.randn(6, 3), torch.randn(6, 3))), batch)
    with pytest.raises(sdk.RequirementError, match="augmentation_aware_discriminator"):
        small(views, sdk.Batch(extras={keys.GENERATED: batch.extras[keys.GENERATED]}))
    with pytest.raises(sdk.ConfigError, match="player"):
        sdk.create("objective", "augmentation_aware_discriminator", player="critic")
    with pytest.raises(sdk.ConfigError, match="groups"):
        sdk.create("objective", "augmentation_aware_discriminator", groups=())
    with pytest.raises(sdk.ConfigError, match="discriminator_weight"):
        sdk.create("objective", "augmentation_aware_discriminator", discriminator_weight=-1.0)
