"""vit, sequence_transformer and conv: the visible-token contract, positions, every parameter
trained (the conformance kit runs in tests/test_conformance.py)."""

import pytest
import torch
from torch import nn

import sdk
from sdk import masking


def _vit(**kw):
    torch.manual_seed(0)
    return sdk.create("encoder", "vit", **{"embed_dim": 16, "depth": 2, "heads": 2, **kw}).eval()


def test_vit_on_visible_tokens_equals_a_sequence_of_only_those_tokens():
    vit = _vit()
    x = torch.rand(3, 64, generator=torch.Generator().manual_seed(1))
    m = masking.random_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(2))
    tokens = vit.features(masking.visible(x, m.ids_keep))
    assert tokens.shape == (3, 1 + 4, 16)
    torch.testing.assert_close(tokens, vit.features(x, ids_keep=m.ids_keep))
    # by hand: embed all patches with positions, keep, prepend the class token, run the blocks
    p = vit.embed(masking.patchify(x.view(3, 1, 8, 8), 2)) + vit.pos[:, 1:]
    kept = torch.stack([p[i, m.ids_keep[i]] for i in range(3)])
    cls = (vit.cls_token + vit.pos[:, :1]).expand(3, -1, -1)
    torch.testing.assert_close(tokens, vit.norm(vit.blocks(torch.cat([cls, kept], 1))))
    # the hidden patches' pixels do not matter; the visible ones do
    hidden = x.view(3, 1, 8, 8).clone()
    flat = masking.patchify(hidden, 2)
    flat[m.mask == 1] = 5.0
    changed = masking.unpatchify(flat, 2, (1, 8, 8))
    torch.testing.assert_close(vit.features(changed, ids_keep=m.ids_keep), tokens)
    assert not torch.allclose(vit.features(x + 0.5, ids_keep=m.ids_keep), tokens)
    # the output pools the tokens: class token or the patch tokens' mean
    torch.testing.assert_close(vit(x), vit.features(x)[:, 0])
    mean = _vit(pool="mean")
    torch.testing.assert_close(mean(x), mean.features(x)[:, 1:].mean(1))


def test_vit_positions_and_image_inputs():
    vit = _vit()
    torch.testing.assert_close(vit.pos[0, 1:], masking.sincos_2d(16, (4, 4)))
    assert not any(n == "pos" for n, _ in vit.named_parameters())  # fixed
    learned = _vit(positions="learned")
    assert learned.pos.requires_grad and learned.pos.shape == (1, 17, 16)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(vit(x), vit(x.flatten(1)))
    # order matters through the positions: a permutation of the patches changes the output
    perm = masking.unpatchify(masking.patchify(x, 2)[:, torch.randperm(16)], 2, (1, 8, 8))
    assert not torch.allclose(vit(perm), vit(x))
    with pytest.raises(sdk.ShapeError, match="encoder 'vit': x must be images \\[B, 1, 8, 8\\]"):
        vit(torch.rand(2, 63))
    with pytest.raises(sdk.ShapeError, match="encoder 'vit': ids_keep must be integer"):
        vit(x, ids_keep=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(sdk.ConfigError, match="vit: in_dim=30 is not"):
        sdk.create("encoder", "vit", in_dim=30)
    with pytest.raises(sdk.ConfigError, match="not a whole number of 3x3 patches"):
        sdk.create("encoder", "vit", patch_size=3)


def _every_parameter_learns(enc, x):
    enc.train()
    enc(x).pow(2).mean().backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_every_parameter_receives_a_gradient():
    g = torch.Generator().manual_seed(0)
    _every_parameter_learns(_vit(positions="learned"), torch.rand(4, 64, generator=g))
    seq = sdk.create("encoder", "sequence_transformer", seq_len=6, in_features=3, patch_size=2,
                     embed_dim=8, depth=1, heads=2, positions="learned")
    _every_parameter_learns(seq, torch.randn(4, 6, 3, generator=g))
    _every_parameter_learns(sdk.create("encoder", "conv", channels=(4, 8), out_dim=5),
                            torch.rand(4, 1, 8, 8, generator=g))


def test_sequence_transformer_tokens_are_runs_of_steps():
    torch.manual_seed(0)
    seq = sdk.create("encoder", "sequence_transformer", seq_len=6, in_features=3, patch_size=2,
                     embed_dim=8, depth=1, heads=2).eval()
    x = torch.randn(2, 6, 3)
    tokens = seq.features(x)
    assert tokens.shape == (2, 4, 8)
    p = seq.embed(x.reshape(2, 3, 6)) + seq.pos[:, 1:]
    cls = (seq.cls_token + seq.pos[:, :1]).expand(2, -1, -1)
    torch.testing.assert_close(tokens, seq.norm(seq.blocks(torch.cat([cls, p], 1))))
    torch.testing.assert_close(seq.pos[0, 1:], masking.sincos_1d(8, torch.arange(3)))
    ids = torch.tensor([[2], [0]])
    torch.testing.assert_close(seq.features(x, ids)[:, 1:],
                               seq.norm(seq.blocks(torch.cat([cls, p.gather(1, ids[..., None].expand(-1, -1, 8))], 1)))[:, 1:])
    with pytest.raises(sdk.ShapeError, match="sequence_transformer.*\\[B, 6, 3\\]"):
        seq(torch.randn(2, 5, 3))
    with pytest.raises(sdk.ConfigError, match="in_dim=10 is not seq_len x in_features"):
        sdk.create("encoder", "sequence_transformer", seq_len=6, in_features=3, in_dim=10)


def test_conv_structure_and_features():
    conv = sdk.create("encoder", "conv", channels=(4, 8), out_dim=5).eval()
    convs = [m for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 4, (3, 3)), (4, 8, (3, 3))]
    x = torch.rand(3, 64)
    h = conv.body[4](conv.body[3](conv.body[2](conv.body[1](conv.body[0](x.view(3, 1, 8, 8))))))
    h = conv.body[7](conv.body[6](conv.body[5](h)))
    torch.testing.assert_close(conv.features(x), h.mean((2, 3)))
    torch.testing.assert_close(conv(x), conv.fc(h.mean((2, 3))))
    with pytest.raises(sdk.ShapeError, match="encoder 'conv': x must be images"):
        conv(torch.rand(3, 1, 7, 8))
