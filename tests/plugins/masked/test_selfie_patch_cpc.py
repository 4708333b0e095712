"""selfie_patch_cpc: the loss against a per-image, per-location loop (value and gradient), log M
when every score is equal, no leak from the visible patches' pixels, and the pretext task learnt
on digits through the Trainer."""

import functools
import math

import pytest
import torch

import sdk
from plugins.masked.selfie_patch_cpc import selfie_loss
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow(u, location, cand):
    """Image by image, location by location, float64."""
    out = []
    for i in range(u.shape[0]):
        m = cand.shape[1]
        total = 0.0
        for j in range(m):
            v = u[i].double() + location[i, j].double()
            scores = torch.stack([v @ cand[i, k].double() for k in range(m)])
            total = total - (scores[j] - torch.logsumexp(scores, 0))
        out.append(total / m)
    return torch.stack(out)


def test_loss_equals_the_slow_loop_value_and_gradient_and_log_m_when_scores_tie():
    u = torch.randn(3, 6, generator=_g(), dtype=torch.float64).requires_grad_()
    loc = torch.randn(3, 4, 6, generator=_g(1), dtype=torch.float64)
    cand = torch.randn(3, 4, 6, generator=_g(2), dtype=torch.float64).requires_grad_()
    got, acc = selfie_loss(u, loc, cand)
    slow = _slow(u, loc, cand)
    torch.testing.assert_close(got.double(), slow, rtol=1e-5, atol=1e-6)
    gu, gc = torch.autograd.grad(got.sum(), [u, cand])
    su, sc = torch.autograd.grad(slow.sum(), [u, cand])
    torch.testing.assert_close(gu.double(), su, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gc.double(), sc, rtol=1e-4, atol=1e-6)
    zero, _ = selfie_loss(torch.zeros(2, 6), torch.zeros(2, 5, 6), torch.randn(2, 5, 6))
    torch.testing.assert_close(zero, torch.full((2,), math.log(5)))
    # a patch aligned with its own location's query, by a wide margin: loss ~0, accuracy 1
    eye = 20 * torch.eye(4, 6).expand(3, 4, 6)
    low, acc = selfie_loss(torch.zeros(3, 6), eye, eye)
    assert low.max() < 1e-6 and acc.eq(1).all()


def _objective():
    torch.manual_seed(0)
    return sdk.create("objective", "selfie_patch_cpc", embed_dim=8, patch_hidden=8).double()


def _inputs(b=3, ratio=0.25, seed=0):
    m = masking.random_mask(b, 16, ratio, generator=_g(seed))
    tokens = torch.randn(b, 1 + m.ids_keep.shape[1], 8, generator=_g(seed + 1),
                         dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 2), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, tokens, patches


def test_objective_equals_the_loop_over_hidden_locations():
    obj = _objective()
    views, batch, m, tokens, patches = _inputs()
    loss = obj(views, batch)
    rows = []
    for i in range(3):
        hid = torch.nonzero(m.mask[i]).flatten()  # any order: the loss is the same
        cand = obj.patch_net(patches[i, hid])
        rows.append(_slow(tokens[i:i + 1, 0], obj.location[hid][None], cand[None]))
    torch.testing.assert_close(loss.value.double(), torch.cat(rows).mean(), rtol=1e-6, atol=1e-8)


def test_visible_patches_pixels_do_not_reach_the_loss():
    obj = _objective()
    views, batch, m, _, patches = _inputs()
    base = obj(views, batch).value
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += 1.0
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert (value != base) == changes


def test_the_pretext_task_is_learnt_on_digits_through_the_trainer():
    x = sdk.data.load("digits").train.tensors[0][:512].float()
    torch.manual_seed(0)
    vit = sdk.create("encoder", "vit", embed_dim=32, depth=1, heads=4)
    obj = sdk.create("objective", "selfie_patch_cpc", embed_dim=32, patch_hidden=32)
    mask = sdk.create("transform", "patch_masking", mask_ratio=0.25)
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, torch.zeros(len(x)).long()),
                                         batch_size=64, shuffle=True)

    def accuracy():
        torch.manual_seed(1)
        with torch.no_grad():
            xv, batch = mask(x, sdk.Batch())
            tokens = vit.features(xv)
            views = sdk.Views(embeddings=(tokens[:, 0],), extras={keys.FEATURES: (tokens,)})
            return float(obj(views, batch).logs["accuracy"])

    before = accuracy()
    sdk.Trainer(vit, obj, functools.partial(torch.optim.Adam, lr=3e-3), transforms=mask,
                max_steps=120, progress=False, device="cpu").fit(loader)
    after = accuracy()
    assert before < 0.35 and after > 0.45, (before, after)  # chance: 1 in 4


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "selfie_patch_cpc")
    assert obj.num_patches == 16 and obj.patch_dim == 4 and obj.batch_coupled is False
    small = _objective()
    views, batch, m, tokens, patches = _inputs(ratio=1 / 16)
    with pytest.raises(sdk.ShapeError, match="'selfie_patch_cpc': 1 hidden patch.*at least 2"):
        small(views, batch)
    views, batch, m, tokens, patches = _inputs()
    with pytest.raises(sdk.ShapeError, match="'selfie_patch_cpc'.*reconstruction_target.*\\[3, 16, 4\\]"):
        small(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}))
    with pytest.raises(sdk.ShapeError, match="'selfie_patch_cpc'.*saw every token"):
        small(views.evolve(extras={keys.FEATURES: (torch.randn(3, 17, 8, dtype=torch.float64),)}), batch)
    with pytest.raises(sdk.RequirementError, match="'selfie_patch_cpc' needs extras\\['mask'\\]"):
        small(views, sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="selfie_patch_cpc: the 8x8 image is not a whole number"):
        sdk.create("objective", "selfie_patch_cpc", patch_size=3)
