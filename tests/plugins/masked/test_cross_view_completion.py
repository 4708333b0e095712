"""cross_view_completion: the loss against decoding with an explicit per-sample restore and the
MAE slow loss (value and gradient, both views), no leak from visible patches, and the second view's
measured use on digits (a true pair completes far better than a mismatched one)."""

import functools

import pytest
import torch

import sdk
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow_loss(pred, patches, mask):
    total, count = 0.0, 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if mask[i, j] != 1:
                continue
            t = patches[i, j].double()
            mean = t.sum() / t.numel()
            var = ((t - mean) ** 2).sum() / (t.numel() - 1)
            t = (t - mean) / torch.sqrt(var + 1e-6)
            total = total + ((pred[i, j].double() - t) ** 2).sum() / t.numel()
            count += 1
    return total / count


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "cross_view_completion", **{
        "embed_dim": 8, "decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2, **kw}).double().eval()


def _inputs(b=3, seed=0):
    m = masking.random_mask(b, 16, 0.75, generator=_g(seed))
    first = torch.randn(b, 1 + m.ids_keep.shape[1], 8, generator=_g(seed + 1),
                        dtype=torch.float64).requires_grad_()
    second = torch.randn(b, 17, 8, generator=_g(seed + 2), dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 3), dtype=torch.float64)
    views = sdk.Views(embeddings=(first[:, 0].detach(), second[:, 0].detach()),
                      extras={keys.FEATURES: (first, second)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, first, second, patches


def test_objective_equals_the_slow_decoding_and_loss_for_both_views():
    obj = _obj()
    views, batch, m, first, second, patches = _inputs()
    loss = obj(views, batch)
    d = obj.decoder
    rows = []
    for i in range(3):
        h = d.embed(first[i])
        seq = [h[0]]
        for pos in range(16):
            where = (m.ids_keep[i] == pos).nonzero()
            seq.append(h[1 + int(where[0, 0])] if len(where) else d.mask_token.double())
        x1 = torch.stack(seq)[None] + d.pos
        x2 = d.embed(second[i:i + 1]) + d.pos
        rows.append(d.pred(d.norm(d.blocks(x1, d.memory_norm(x2))))[0, 1:])
    slow = _slow_loss(torch.stack(rows), patches, m.mask)
    torch.testing.assert_close(loss.value.double(), slow, rtol=1e-6, atol=1e-9)
    g1, g2 = torch.autograd.grad(loss.value, [first, second])
    s1, s2 = torch.autograd.grad(slow, [first, second])
    torch.testing.assert_close(g1, s1, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g2, s2, rtol=1e-6, atol=1e-9)
    assert g2.abs().sum(-1).gt(0).all()  # every token of the second view is attended to


def test_visible_patches_do_not_reach_the_loss():
    obj = _obj()
    views, batch, m, _, _, patches = _inputs()
    base = obj(views, batch).value
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += torch.rand(int((m.mask == hide).sum()), 4, generator=_g(9),
                                            dtype=torch.float64)
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert (value != base) == changes


class _Other(sdk.interfaces.Transform):
    """The second view of another sample (the batch rolled by one): a mismatched pair."""

    def forward(self, x, batch):
        return x.roll(1, 0), batch


def test_the_second_view_is_used_to_complete_the_first_on_digits():
    x = sdk.data.load("digits").train.tensors[0][:512].float()
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, torch.zeros(len(x)).long()),
                                         batch_size=64, shuffle=True)

    def train(second):
        torch.manual_seed(0)
        vit = sdk.create("encoder", "vit", embed_dim=16, depth=1, heads=2)
        obj = sdk.create("objective", "cross_view_completion", embed_dim=16, decoder_dim=16,
                         decoder_depth=1, decoder_heads=2)
        mask = sdk.create("transform", "patch_masking", mask_ratio=0.9)
        sdk.Trainer(vit, obj, functools.partial(torch.optim.Adam, lr=3e-3), transforms=[mask, second],
                    max_steps=200, progress=False, device="cpu").fit(loader)
        torch.manual_seed(1)
        with torch.no_grad():
            x1, batch = mask(x, sdk.Batch())
            x2, _ = (second or (lambda a, b: (a, b)))(x, batch)
            t1, t2 = vit.features(x1), vit.features(x2)
            views = sdk.Views(embeddings=(t1[:, 0], t2[:, 0]), extras={keys.FEATURES: (t1, t2)})
            return float(obj(views, batch).value)

    same, other = train(None), train(_Other())
    assert same < 0.5 * other, (same, other)  # measured: 0.13 against 0.45


def test_defaults_are_crocos_and_errors_name_the_plugin():
    obj = sdk.create("objective", "cross_view_completion")
    assert obj.norm_pix_loss is True and obj.batch_coupled is False
    small = _obj()
    views, batch, m, first, second, patches = _inputs()
    with pytest.raises(sdk.RequirementError, match="'cross_view_completion' needs at least 2 views"):
        small(sdk.Views(embeddings=(first[:, 0],), extras={keys.FEATURES: (first,)}), batch)
    masked_second = sdk.Views(embeddings=views.embeddings, extras={keys.FEATURES: (first, first)})
    with pytest.raises(sdk.ShapeError, match="'cross_view_completion': the second view's tokens must be "
                                             "whole.*\\[3, 17, 8\\]"):
        small(masked_second, batch)
    with pytest.raises(sdk.ShapeError, match="'cross_view_completion'.*saw every token"):
        small(sdk.Views(embeddings=views.embeddings, extras={keys.FEATURES: (second, second)}), batch)
    bad = {**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}
    with pytest.raises(sdk.ShapeError, match="'cross_view_completion'.*\\[3, 16, 4\\]"):
        small(views, batch.evolve(extras=bad))
