"""masked_feature_reconstruction: the loss against a token-by-token loop (both distances, value and
gradient), no leak from visible tokens, the teacher's features of the whole input as targets, and
training with an ema teacher on digits."""

import functools

import pytest
import torch

import sdk
from plugins.masked.masked_feature_reconstruction import masked_feature_loss
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow(pred, target, mask, distance):
    total, count = 0.0, 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if mask[i, j] != 1:
                continue
            p, t = pred[i, j].double(), target[i, j].double()
            if distance == "cosine":
                total = total + 1 - (p @ t) / (p.norm() * t.norm())
            else:
                total = total + ((p - t) ** 2).sum() / p.numel()
            count += 1
    return total / count


@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_loss_equals_the_slow_loop_value_and_gradient(distance):
    pred = torch.randn(3, 8, 5, generator=_g(), dtype=torch.float64).requires_grad_()
    target = torch.randn(3, 8, 5, generator=_g(1), dtype=torch.float64)
    mask = masking.random_mask(3, 8, 0.75, generator=_g(2)).mask
    value, per_sample = masked_feature_loss(pred, target, mask, distance)
    slow = _slow(pred, target, mask, distance)
    torch.testing.assert_close(value.double(), slow, rtol=1e-5, atol=1e-7)
    g, = torch.autograd.grad(value, pred)
    g_slow, = torch.autograd.grad(slow, pred)
    torch.testing.assert_close(g.double(), g_slow, rtol=1e-4, atol=1e-7)
    assert not g[mask == 0].any()
    # a prediction equal to the target (any positive scale for the cosine) costs nothing
    scale = 3.0 if distance == "cosine" else 1.0
    assert float(masked_feature_loss(scale * target, target, mask, distance)[0]) < 1e-6


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "masked_feature_reconstruction", **{
        "embed_dim": 8, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2, **kw}).double()


def test_visible_tokens_targets_do_not_reach_the_loss():
    obj = _obj()
    m = masking.random_mask(3, 16, 0.75, generator=_g())
    tokens = torch.randn(3, 5, 8, generator=_g(1), dtype=torch.float64)
    target = torch.randn(3, 16, 8, generator=_g(2), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0],), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: target})
    base = obj(views, batch).value
    torch.testing.assert_close(base, masked_feature_loss(obj.decoder(tokens, m.ids_restore), target,
                                                         m.mask)[0])
    for hide, changes in ((0, False), (1, True)):
        moved = target.clone()
        moved[m.mask == hide] += 1.0
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert (value != base) == changes


def test_targets_are_the_teachers_features_of_the_whole_input_and_training_lowers_the_loss():
    x = sdk.data.load("digits").train.tensors[0][:256].float()
    torch.manual_seed(0)
    vit = sdk.create("encoder", "vit", embed_dim=16, depth=1, heads=2)
    obj = sdk.create("objective", "masked_feature_reconstruction", embed_dim=16, decoder_dim=16,
                     decoder_depth=1, decoder_heads=2)
    teacher = sdk.create("teacher", "ema", momentum=0.99)
    tf = obj.masking(teacher)
    with pytest.raises(sdk.RequirementError, match="'masked_feature_targets' needs the teacher"):
        tf(x[:4], sdk.Batch())
    teacher.attach(vit)
    xv, batch = tf(x[:4], sdk.Batch())
    with torch.no_grad():
        full = teacher.target.features(x[:4])[:, 1:]
    torch.testing.assert_close(batch.extras[keys.RECONSTRUCTION_TARGET], full)
    plain, ids_keep = masking.split_visible(xv)
    assert ids_keep.shape == (4, 4) and torch.equal(plain, x[:4])
    # an input already marked with visible ids: the teacher still sees all of it
    _, again = tf(masking.visible(x[:4], ids_keep), sdk.Batch())
    torch.testing.assert_close(again.extras[keys.RECONSTRUCTION_TARGET], full)

    def loss():
        torch.manual_seed(1)
        with torch.no_grad():
            xv, b = tf(x, sdk.Batch())
            t = vit.features(xv)
            return float(obj(sdk.Views(embeddings=(t[:, 0],), extras={keys.FEATURES: (t,)}), b).value)

    before = loss()
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, torch.zeros(len(x)).long()),
                                         batch_size=64, shuffle=True)
    sdk.Trainer(vit, obj, functools.partial(torch.optim.Adam, lr=3e-3), teacher=teacher,
                transforms=tf, max_steps=40, progress=False, device="cpu").fit(loader)
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "masked_feature_reconstruction")
    assert obj.distance == "cosine" and obj.mask_ratio == 0.75 and obj.target_dim == 64
    small = _obj()
    m = masking.random_mask(2, 16, 0.75, generator=_g())
    tokens = torch.randn(2, 5, 8, dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0],), extras={keys.FEATURES: (tokens,)})
    bad = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                            keys.RECONSTRUCTION_TARGET: torch.randn(2, 16, 7)})
    with pytest.raises(sdk.ShapeError, match="'masked_feature_reconstruction'.*teacher's token "
                                             "features \\[2, 16, 8\\]"):
        small(views, bad)
    with pytest.raises(sdk.ConfigError, match="masked_feature_reconstruction: grid \\(3, 3\\)"):
        sdk.create("objective", "masked_feature_reconstruction", grid=(3, 3))
    with pytest.raises(sdk.ConfigError, match="distance must be one of"):
        sdk.create("objective", "masked_feature_reconstruction", distance="l1")
    with pytest.raises(sdk.ConfigError, match="masked_feature_targets: take it from its objective"):
        small.masking(None)
