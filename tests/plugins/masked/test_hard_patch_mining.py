"""hard_patch_mining: the relative loss of the loss predictor against a slow loop (value and
gradient), masks from the stored predictions against top-k, the easy-to-hard schedule, and an
exact resume of its memory."""

import math

import pytest
import torch

import sdk
from plugins.masked.hard_patch_mining import hard_fraction
from sdk import keys, masking, testing


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow_rank(s, e):
    """HPM's relative loss, image by image and pair by pair (float64)."""
    out = []
    for si, ei in zip(s, e):
        total, pairs = 0.0, 0
        for i in range(len(ei)):
            for j in range(len(ei)):
                if ei[i] == ei[j]:
                    continue
                p = torch.sigmoid(si[i].double() - si[j].double())
                total = total - (torch.log(p) if ei[i] > ei[j] else torch.log(1 - p))
                pairs += 1
        out.append(total / pairs)
    return torch.stack(out)


def test_relative_loss_equals_the_slow_pairwise_formula():
    s = torch.randn(3, 6, generator=_g(), dtype=torch.float64).requires_grad_()
    e = torch.rand(3, 6, generator=_g(1), dtype=torch.float64)
    e[0, 1] = e[0, 2]  # a tie is no pair
    got = masking.pairwise_rank_loss(s, e)
    slow = _slow_rank(s, e)
    torch.testing.assert_close(got.double(), slow, rtol=1e-5, atol=1e-7)
    g, = torch.autograd.grad(got.sum(), s)
    g_slow, = torch.autograd.grad(slow.sum(), s)
    torch.testing.assert_close(g, g_slow, rtol=1e-5, atol=1e-7)
    # it vanishes when the predictions order the patches as the losses do, by a wide margin
    ranks = e.argsort(1).argsort(1).double()
    assert float(masking.pairwise_rank_loss(50 * ranks, e).max()) < 1e-6
    torch.testing.assert_close(masking.pairwise_rank_loss(torch.zeros(3, 6), e.float()),
                               torch.full((3,), math.log(2)))


def test_schedule_is_easy_to_hard():
    assert hard_fraction(0, 100, 0.5) == pytest.approx(0.005)
    assert hard_fraction(49, 100, 0.5) == pytest.approx(0.25)
    assert hard_fraction(99, 100, 0.5) == pytest.approx(0.5)
    assert hard_fraction(10, None, 0.5) == 0.5


def _hpm(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "hard_patch_mining", **{
        "embed_dim": 8, "decoder_dim": 8, "decoder_depth": 1, "predictor_depth": 1,
        "decoder_heads": 2, "num_samples": 20, **kw})


def test_masks_hide_the_highest_stored_predictions():
    hpm = _hpm(hard_ratio=1.0)
    stored = torch.randn(20, 16, generator=_g())
    hpm.remember(torch.arange(20), stored)
    hpm.set_progress(99, 100)  # the last step: every hidden patch chosen by prediction
    index = torch.tensor([3, 7, 11])
    x, batch = hpm.masking(torch.rand(3, 64), sdk.Batch(index=index))
    mask = batch.extras[keys.MASK]
    for row, i in enumerate(index.tolist()):
        top = set(stored[i].topk(12).indices.tolist())
        assert set(torch.nonzero(mask[row]).flatten().tolist()) == top
    plain, ids_keep = masking.split_visible(x)
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(3, 4))
    # halfway through with hard_ratio 0.5: floor(0.25 * 12) = 3 of the top, the rest random
    half = _hpm()
    half.remember(torch.arange(20), stored)
    half.set_progress(49, 100)
    _, b2 = half.masking(torch.rand(3, 64), sdk.Batch(index=index))
    for row, i in enumerate(index.tolist()):
        assert b2.extras[keys.MASK][row, stored[i].topk(3).indices].eq(1).all()
    # samples never seen get a random mask, not the first patches
    fresh = _hpm(hard_ratio=1.0)
    fresh.set_progress(99, 100)
    masks = fresh.masking(torch.rand(8, 64), sdk.Batch(index=torch.arange(8)))[1].extras[keys.MASK]
    assert len({tuple(m.tolist()) for m in masks}) > 1


def test_loss_is_mae_plus_the_relative_loss_and_the_predictions_are_stored():
    hpm = _hpm(weight=0.3).eval()
    m = masking.random_mask(4, 16, 0.75, generator=_g(2))
    tokens = torch.randn(4, 5, 8, generator=_g(3))
    patches = torch.rand(4, 16, 4, generator=_g(4))
    views = sdk.Views(embeddings=(tokens[:, 0],), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(index=torch.tensor([5, 0, 9, 2]), extras={
        keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore, keys.RECONSTRUCTION_TARGET: patches})
    loss = hpm(views, batch)
    h = hpm.decoder.inputs(tokens, m.ids_restore)
    pred = hpm.decoder.head(h)
    scores = hpm.predictor_out(hpm.predictor_norm(hpm.predictor(h)))[:, 1:, 0]
    target = masking.normalized_patches(patches)
    recon, _ = masking.masked_mse(pred, target, m.mask)
    err = (pred - target).pow(2).mean(-1)
    hidden = [torch.nonzero(m.mask[i]).flatten() for i in range(4)]
    rank = _slow_rank(torch.stack([scores[i, hidden[i]] for i in range(4)]),
                      torch.stack([err[i, hidden[i]] for i in range(4)]).detach())
    torch.testing.assert_close(loss.value, recon + 0.3 * rank.float().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hpm.predicted[[5, 0, 9, 2]], scores.detach())
    assert hpm.seen.sum() == 4 and hpm.seen[[5, 0, 9, 2]].all()
    with pytest.raises(sdk.RequirementError, match="'hard_patch_mining' needs Batch.index"):
        hpm(views, sdk.Batch(extras=dict(batch.extras)))


def test_resume_restores_the_stored_predictions(tmp_path):
    made = []

    def objective():
        made.append(sdk.create("objective", "hard_patch_mining", image_shape=(1, 2, 3), patch_size=1,
                               embed_dim=8, mask_ratio=0.5, decoder_dim=8, decoder_depth=1,
                               predictor_depth=1, decoder_heads=2, num_samples=40,
                               norm_pix_loss=False))  # 1-value patches have no variance
        return made[-1]

    def encoder():
        return sdk.create("encoder", "vit", image_shape=(1, 2, 3), patch_size=1, embed_dim=8,
                          depth=1, heads=2)

    runs = testing.check_resume(tmp_dir=tmp_path, objective=objective, transforms=lambda: made[-1].masking,
                                encoder=encoder)
    assert runs.straight.objective.seen.any()
