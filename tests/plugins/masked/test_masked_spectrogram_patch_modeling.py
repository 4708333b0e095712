"""masked_spectrogram_patch_modeling: both terms against a per-sample, per-patch loop (value and
gradient), log N when the scores tie, the weight 10 of SSAST, no leak from visible patches, and
sequences of spectrogram-like frames through patch_masking and sequence_transformer."""

import math

import pytest
import torch

import sdk
from plugins.masked.masked_spectrogram_patch_modeling import mspm_loss
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow(c, g, x, w):
    out = []
    for b in range(c.shape[0]):
        n = c.shape[1]
        disc = 0.0
        for i in range(n):
            scores = torch.stack([c[b, i].double() @ x[b, j].double() for j in range(n)])
            disc = disc - (scores[i] - torch.logsumexp(scores, 0))
        gen = sum(((g[b, i].double() - x[b, i].double()) ** 2).sum() for i in range(n)) / (n * x.shape[2])
        out.append(disc / n + w * gen)
    return torch.stack(out)


def test_loss_equals_the_slow_loop_value_and_gradient():
    c = torch.randn(3, 5, 4, generator=_g(), dtype=torch.float64).requires_grad_()
    g = torch.randn(3, 5, 4, generator=_g(1), dtype=torch.float64).requires_grad_()
    x = torch.rand(3, 5, 4, generator=_g(2), dtype=torch.float64)
    per_sample, disc, gen, acc = mspm_loss(c, g, x, 10.0)
    slow = _slow(c, g, x, 10.0)
    torch.testing.assert_close(per_sample.double(), slow, rtol=1e-5, atol=1e-6)
    gc, gg = torch.autograd.grad(per_sample.sum(), [c, g])
    sc, sg = torch.autograd.grad(slow.sum(), [c, g])
    torch.testing.assert_close(gc.double(), sc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gg.double(), sg, rtol=1e-4, atol=1e-6)
    _, tie, _, _ = mspm_loss(torch.zeros(2, 6, 4), torch.zeros(2, 6, 4), torch.rand(2, 6, 4))
    torch.testing.assert_close(tie, torch.full((2,), math.log(6)))


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "masked_spectrogram_patch_modeling", **{
        "embed_dim": 8, "decoder_dim": 8, "decoder_heads": 2, "head_hidden": 8, **kw}).double()


def _inputs(b=3, ratio=0.75, seed=0):
    m = masking.random_mask(b, 16, ratio, generator=_g(seed))
    tokens = torch.randn(b, 1 + m.ids_keep.shape[1], 8, generator=_g(seed + 1),
                         dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 2), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, tokens, patches


def test_objective_is_both_heads_at_the_hidden_patches_weighted_as_ssast():
    obj = _obj()
    views, batch, m, tokens, patches = _inputs()
    loss = obj(views, batch)
    out = obj.decoder(tokens, m.ids_restore)
    rows = []
    for i in range(3):
        hid = torch.nonzero(m.mask[i]).flatten()
        o = out[i, hid][None]
        rows.append(_slow(obj.classify(o), obj.reconstruct(o), patches[i, hid][None], 10.0))
    torch.testing.assert_close(loss.value.double(), torch.cat(rows).mean(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(loss.value, loss.logs["discriminative"] + 10 * loss.logs["generative"])
    base = loss.value
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += 1.0
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert (value != base) == changes


def test_sequences_of_frames_train_through_patch_masking_and_sequence_transformer():
    g = _g(4)
    t = torch.arange(16).float()
    freq = torch.rand(256, 1, generator=g) * 0.8 + 0.2
    frames = torch.sin(freq[:, :, None] * t[None, :, None] + torch.arange(4).float())  # [256, 16, 4]
    mask = sdk.create("transform", "patch_masking", image_shape=None, sequence_shape=(16, 4),
                      patch_size=2, mask_ratio=0.5)
    torch.manual_seed(0)
    enc = sdk.create("encoder", "sequence_transformer", seq_len=16, in_features=4, patch_size=2,
                     embed_dim=16, depth=1, heads=2)
    obj = sdk.create("objective", "masked_spectrogram_patch_modeling", num_tokens=8, grid=(8,),
                     patch_dim=8, embed_dim=16, decoder_dim=16, decoder_heads=2, head_hidden=16)
    opt = torch.optim.Adam([*enc.parameters(), *obj.parameters()], lr=3e-3)

    def step():
        xv, batch = mask(frames, sdk.Batch())
        tok = enc.features(xv)
        return obj(sdk.Views(embeddings=(tok[:, 0],), extras={keys.FEATURES: (tok,)}), batch)

    torch.manual_seed(1)
    first = step()
    for _ in range(150):
        loss = step()
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    assert float(loss.logs["accuracy"]) > float(first.logs["accuracy"]) + 0.3
    assert float(loss.logs["generative"]) < 0.5 * float(first.logs["generative"])


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "masked_spectrogram_patch_modeling")
    assert obj.gen_weight == 10.0 and obj.batch_coupled is False  # SSAST's lambda
    small = _obj()
    views, batch, m, tokens, patches = _inputs(ratio=1 / 16)
    with pytest.raises(sdk.ShapeError, match="'masked_spectrogram_patch_modeling': 1 hidden patch"):
        small(views, batch)
    views, batch, m, tokens, patches = _inputs()
    bad = {**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}
    with pytest.raises(sdk.ShapeError, match="'masked_spectrogram_patch_modeling'.*\\[3, 16, 4\\]"):
        small(views, batch.evolve(extras=bad))
    with pytest.raises(sdk.ConfigError, match="masked_spectrogram_patch_modeling: grid \\(3,\\)"):
        sdk.create("objective", "masked_spectrogram_patch_modeling", grid=(3,))
    with pytest.raises(sdk.ConfigError, match="gen_weight must be >= 0"):
        sdk.create("objective", "masked_spectrogram_patch_modeling", gen_weight=-1.0)
