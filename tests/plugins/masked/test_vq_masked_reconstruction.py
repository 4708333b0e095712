"""vq_masked_reconstruction: quantisation equals the nearest codeword by a loop, the
straight-through gradient, the codebook and commitment losses by hand (value and which tensor each
trains), the whole objective against its parts, no leak from visible patches, and errors."""

import pytest
import torch

import sdk
from plugins.masked.vq_masked_reconstruction import vector_quantize
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_quantisation_is_the_nearest_codeword_and_the_losses_are_vq_vaes():
    z = torch.randn(3, 5, 4, generator=_g(), dtype=torch.float64).requires_grad_()
    book = torch.randn(7, 4, generator=_g(1), dtype=torch.float64).requires_grad_()
    z_q, codes, cb, commit = vector_quantize(z, book)
    for b in range(3):
        for t in range(5):
            dists = [float(((z[b, t] - book[k]) ** 2).sum().detach()) for k in range(7)]
            k = min(range(7), key=dists.__getitem__)
            assert int(codes[b, t]) == k
            torch.testing.assert_close(z_q[b, t], book[k])
    slow = torch.stack([sum(((z[b, t] - book[codes[b, t]]) ** 2).sum() for t in range(5)) / 5
                        for b in range(3)])
    torch.testing.assert_close(cb, slow)
    torch.testing.assert_close(commit, slow)
    # the codebook loss trains only the codebook, the commitment loss only the encodings
    gz, gb = torch.autograd.grad(cb.sum(), [z, book], allow_unused=True)
    assert gz is None and gb.abs().sum() > 0
    gz, gb = torch.autograd.grad(commit.sum(), [z, book], allow_unused=True)
    assert gb is None
    torch.testing.assert_close(gz, 2 * (z - book[codes]).detach() / 5)
    # straight-through: the gradient of a function of z_q reaches z unchanged
    w = torch.randn(3, 5, 4, generator=_g(2), dtype=torch.float64)
    gz, = torch.autograd.grad((z_q * w).sum(), z)
    torch.testing.assert_close(gz, w)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "vq_masked_reconstruction", **{
        "embed_dim": 8, "code_dim": 4, "codebook_size": 6, "decoder_dim": 8, "decoder_depth": 1,
        "decoder_heads": 2, **kw}).double()


def _inputs(b=3, seed=0):
    m = masking.random_mask(b, 16, 0.5, generator=_g(seed))
    tokens = torch.randn(b, 1 + m.ids_keep.shape[1], 8, generator=_g(seed + 1),
                         dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 2), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, tokens, patches


def test_objective_is_hidden_patch_mse_plus_codebook_plus_beta_commitment():
    obj = _obj(beta=0.7)
    views, batch, m, tokens, patches = _inputs()
    loss = obj(views, batch)
    z = obj.project(tokens)
    z_q, codes, cb, commit = vector_quantize(z, obj.codebook)
    pred = obj.decoder(obj.codebook[codes], m.ids_restore)  # the decoder sees the codewords
    total, count = 0.0, 0
    for i in range(3):
        for j in range(16):
            if m.mask[i, j] == 1:
                total = total + ((pred[i, j] - patches[i, j]) ** 2).mean()
                count += 1
    expected = total / count + cb.mean() + 0.7 * commit.mean()
    torch.testing.assert_close(loss.value.double(), expected, rtol=1e-6, atol=1e-9)
    g, = torch.autograd.grad(loss.value, obj.codebook)
    assert g[codes.unique()].abs().sum(1).gt(0).all()  # every used codeword learns
    base = loss.value.detach()
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += 1.0
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert (value.detach() != base) == changes
    assert 1 <= float(loss.logs["perplexity"]) <= 6


def test_multichannel_series_train_with_a_used_codebook():
    g = _g(4)
    t = torch.arange(16).float()
    freq = torch.rand(256, 1, generator=g) * 0.8 + 0.2
    series = torch.sin(freq[:, :, None] * t[None, :, None] + torch.arange(3).float())  # [256, 16, 3]
    mask = sdk.create("transform", "patch_masking", image_shape=None, sequence_shape=(16, 3),
                      patch_size=2, mask_ratio=0.5)
    torch.manual_seed(0)
    enc = sdk.create("encoder", "sequence_transformer", seq_len=16, in_features=3, patch_size=2,
                     embed_dim=16, depth=1, heads=2)
    obj = sdk.create("objective", "vq_masked_reconstruction", num_tokens=8, grid=(8,), patch_dim=6,
                     embed_dim=16, code_dim=8, codebook_size=32, decoder_dim=16, decoder_depth=1,
                     decoder_heads=2)
    opt = torch.optim.Adam([*enc.parameters(), *obj.parameters()], lr=3e-3)

    def step():
        xv, batch = mask(series, sdk.Batch())
        tok = enc.features(xv)
        return obj(sdk.Views(embeddings=(tok[:, 0],), extras={keys.FEATURES: (tok,)}), batch)

    torch.manual_seed(1)
    first = step()
    for _ in range(150):
        loss = step()
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    assert float(loss.logs["reconstruction"]) < 0.5 * float(first.logs["reconstruction"])
    assert float(loss.logs["perplexity"]) > 2.0  # more than a couple of codewords in use


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "vq_masked_reconstruction")
    assert obj.beta == 0.25 and obj.codebook.shape == (256, 16)  # VQ-VAE's beta
    small = _obj()
    views, batch, m, tokens, patches = _inputs()
    bad = {**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}
    with pytest.raises(sdk.ShapeError, match="'vq_masked_reconstruction'.*\\[3, 16, 4\\]"):
        small(views, batch.evolve(extras=bad))
    with pytest.raises(sdk.ShapeError, match="'vq_masked_reconstruction'.*saw every token"):
        small(views.evolve(extras={keys.FEATURES: (torch.randn(3, 17, 8, dtype=torch.float64),)}), batch)
    with pytest.raises(sdk.ConfigError, match="vq_masked_reconstruction: grid \\(3, 3\\)"):
        sdk.create("objective", "vq_masked_reconstruction", grid=(3, 3))
    with pytest.raises(sdk.ConfigError, match="codebook_size must be >= 2"):
        sdk.create("objective", "vq_masked_reconstruction", codebook_size=1)
