"""mae: the loss against a slow formula (value and gradient), the decoder's restore against a
loop, no leak from visible patches, and the patch_masking transform that feeds it."""

import pytest
import torch

import sdk
from plugins.masked.mae import mae_loss
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow_loss(pred, patches, mask, norm=True):
    """Patch by patch, float64: MAE's forward_loss."""
    total, count = 0.0, 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if mask[i, j] != 1:
                continue
            t = patches[i, j].double()
            if norm:
                mean = t.sum() / t.numel()
                var = ((t - mean) ** 2).sum() / (t.numel() - 1)
                t = (t - mean) / torch.sqrt(var + 1e-6)
            total = total + ((pred[i, j].double() - t) ** 2).sum() / t.numel()
            count += 1
    return total / count


@pytest.mark.parametrize("norm", [True, False])
def test_loss_value_and_gradient_equal_the_slow_formula(norm):
    pred = torch.randn(3, 8, 5, generator=_g(), dtype=torch.float64).requires_grad_()
    patches = torch.rand(3, 8, 5, generator=_g(1), dtype=torch.float64)
    mask = masking.random_mask(3, 8, 0.75, generator=_g(2)).mask
    value, per_sample = mae_loss(pred, patches, mask, norm_pix_loss=norm)
    slow = _slow_loss(pred, patches, mask, norm)
    torch.testing.assert_close(value.double(), slow, rtol=1e-5, atol=1e-7)
    assert per_sample.shape == (3,)
    g, = torch.autograd.grad(value, pred)
    g_slow, = torch.autograd.grad(slow, pred)
    torch.testing.assert_close(g.double(), g_slow, rtol=1e-5, atol=1e-8)
    assert not g[mask == 0].any()  # visible patches get no gradient


def _mae(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "mae", **{"embed_dim": 8, "decoder_dim": 8, "decoder_depth": 1,
                                             "decoder_heads": 2, **kw}).double().eval()


def _inputs(b=3, ratio=0.75, seed=0, dim=8):
    m = masking.random_mask(b, 16, ratio, generator=_g(seed))
    tokens = torch.randn(b, 1 + m.ids_keep.shape[1], dim, generator=_g(seed + 1),
                         dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 2), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(index=torch.arange(b), extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                                                     keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, tokens, patches


def test_objective_equals_decoding_with_a_loop_over_samples_and_positions():
    obj = _mae()
    views, batch, m, tokens, patches = _inputs()
    loss = obj(views, batch)
    d = obj.decoder
    rows = []
    for i in range(3):
        h = d.embed(tokens[i])
        seq = [h[0]]
        for pos in range(16):
            where = (m.ids_keep[i] == pos).nonzero()
            seq.append(h[1 + int(where[0, 0])] if len(where) else d.mask_token.double())
        x = torch.stack(seq)[None] + d.pos
        rows.append(d.pred(d.norm(d.blocks(x)))[0, 1:])
    slow = _slow_loss(torch.stack(rows), patches, m.mask)
    torch.testing.assert_close(loss.value.double(), slow, rtol=1e-6, atol=1e-9)
    g, = torch.autograd.grad(loss.value, tokens)
    g_slow, = torch.autograd.grad(slow, tokens)
    torch.testing.assert_close(g, g_slow, rtol=1e-6, atol=1e-9)
    assert g.abs().sum(-1).gt(0).all()  # every visible token and the class token are used


def test_visible_patches_do_not_reach_the_loss():
    obj = _mae()
    views, batch, m, _, patches = _inputs()
    base = obj(views, batch).value
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += torch.rand(int((m.mask == hide).sum()), 4, generator=_g(9),
                                            dtype=torch.float64)
        extras = {**batch.extras, keys.RECONSTRUCTION_TARGET: moved}
        value = obj(views, batch.evolve(extras=extras)).value
        assert (value != base) == changes


def test_defaults_are_the_papers():
    obj = sdk.create("objective", "mae")
    assert obj.norm_pix_loss is True
    assert sdk.create("transform", "patch_masking").mask_ratio == 0.75
    assert obj.batch_coupled is False


def test_errors_name_mae_and_the_field():
    obj = _mae()
    views, batch, m, tokens, patches = _inputs()
    full = torch.randn(3, 17, 8, dtype=torch.float64)
    with pytest.raises(sdk.ShapeError, match="'mae'.*saw every token.*patch_masking"):
        obj(views.evolve(extras={keys.FEATURES: (full,)}), batch)
    with pytest.raises(sdk.ShapeError, match="'mae'.*features.*\\[B, 1 \\+ K, 8\\]"):
        obj(views.evolve(extras={keys.FEATURES: (tokens[..., :5],)}), batch)
    with pytest.raises(sdk.RequirementError, match="'mae' needs extras\\['mask'\\]"):
        obj(views, sdk.Batch(index=torch.arange(3)))
    with pytest.raises(sdk.ConfigError, match="mae: norm_pix_loss standardises each patch"):
        sdk.create("objective", "mae", patch_size=1)
    bad = {**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}
    with pytest.raises(sdk.ShapeError, match="'mae'.*reconstruction_target.*\\[3, 16, 4\\]"):
        obj(views, batch.evolve(extras=bad))


def test_patch_masking_feeds_the_encoder_and_the_objective():
    tf = sdk.create("transform", "patch_masking")
    x = torch.rand(5, 64, generator=_g())
    out, batch = tf(x, sdk.Batch(index=torch.arange(5)))
    plain, ids_keep = masking.split_visible(out)
    assert torch.equal(plain, x) and ids_keep.shape == (5, 4)
    mask, restore = batch.extras[keys.MASK], batch.extras[keys.IDS_RESTORE]
    assert torch.equal(mask.sum(1), torch.full((5,), 12.0))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(5, 4))
    assert torch.equal(restore.gather(1, ids_keep), torch.arange(4).expand(5, 4))
    assert torch.equal(batch.extras[keys.RECONSTRUCTION_TARGET], masking.patchify(x.view(5, 1, 8, 8), 2))
    block = sdk.create("transform", "patch_masking", strategy="block", mask_ratio=0.5)
    assert torch.equal(block(x, sdk.Batch())[1].extras[keys.MASK].sum(1), torch.full((5,), 8.0))
    seq = sdk.create("transform", "patch_masking", image_shape=None, sequence_shape=(6, 3),
                     patch_size=2, mask_ratio=0.5)
    s = torch.randn(2, 6, 3)
    _, b2 = seq(s, sdk.Batch())
    assert torch.equal(b2.extras[keys.RECONSTRUCTION_TARGET], s.reshape(2, 3, 6))
    with pytest.raises(sdk.ConfigError, match="sequences take strategy='random'"):
        sdk.create("transform", "patch_masking", image_shape=None, sequence_shape=(6, 3),
                   strategy="block")
    with pytest.raises(sdk.ShapeError, match="'patch_masking': x must be images"):
        tf(torch.rand(5, 63), sdk.Batch())
