"""contrastive_plus_mlm: the code ids are the argmax of the quantiser's logits (a loop), the hard
Gumbel choice is a codeword with a straight-through gradient, the objective equals the
contrastive loss, the MLM cross-entropy on the code ids and the diversity written as loops
(value and gradient), no leak from visible positions, the diversity's analytic values, defaults
and errors."""


import pytest
import torch

import sdk
from plugins.masked.contrastive_plus_mlm import diversity_loss, quantize
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "contrastive_plus_mlm", **{
        "embed_dim": 8, "code_dim": 4, "codebook_size": 6, "decoder_dim": 8, "decoder_heads": 2,
        **kw}).double()


def _inputs(b=3, seed=0):
    m = masking.random_mask(b, 16, 0.5, generator=_g(seed))
    tokens = torch.randn(b, 1 + m.ids_keep.shape[1], 8, generator=_g(seed + 1),
                         dtype=torch.float64).requires_grad_()
    patches = torch.rand(b, 16, 4, generator=_g(seed + 2), dtype=torch.float64)
    views = sdk.Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    batch = sdk.Batch(extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore,
                              keys.RECONSTRUCTION_TARGET: patches})
    return views, batch, m, tokens, patches


def test_codes_are_the_argmax_and_gumbel_choices_are_codewords_with_straight_through():
    logits = torch.randn(4, 5, 6, generator=_g(), dtype=torch.float64).requires_grad_()
    book = torch.randn(6, 3, generator=_g(1), dtype=torch.float64)
    q, ids = quantize(logits, book, tau=None)
    for i in range(4):
        for t in range(5):
            k = max(range(6), key=lambda v: float(logits[i, t, v].detach()))
            assert int(ids[i, t]) == k
            torch.testing.assert_close(q[i, t], book[k])
    torch.manual_seed(0)
    q, ids = quantize(logits, book, tau=2.0)
    torch.testing.assert_close(q, book[ids])
    g, = torch.autograd.grad(q.sum(), logits)
    assert g.abs().sum() > 0  # the soft relaxation's gradient reaches the logits


def test_diversity_analytic_values():
    v = 6
    uniform = torch.full((5, v), 1 / v, dtype=torch.float64)
    torch.testing.assert_close(diversity_loss(uniform), torch.tensor(0.0, dtype=torch.float64))
    one_code = torch.zeros(5, v, dtype=torch.float64)
    one_code[:, 2] = 1
    torch.testing.assert_close(diversity_loss(one_code), torch.tensor((v - 1) / v, dtype=torch.float64))


def _slow(obj, m, tokens, patches):
    h = obj.decoder(tokens, m.ids_restore)
    mlm_all = obj.mlm_head(obj.mlm_blocks(h))
    total, probs = 0.0, []
    b = tokens.shape[0]
    for i in range(b):
        hid = [j for j in range(16) if m.mask[i, j] == 1]
        c = [obj.project(h[i, j]) for j in hid]
        lg = [obj.code_logits(patches[i, j]) for j in hid]
        ids = [int(torch.argmax(x)) for x in lg]
        q = [obj.codebook[k] for k in ids]
        cos = lambda a, z: (a @ z) / (a.norm() * z.norm())  # noqa: E731
        con = sum(-torch.log(torch.exp(cos(c[t], q[t]) / 0.1)
                             / sum(torch.exp(cos(c[t], q[u]) / 0.1) for u in range(len(hid))))
                  for t in range(len(hid))) / len(hid)
        mlm = sum(-torch.log_softmax(mlm_all[i, j], 0)[k] for j, k in zip(hid, ids)) / len(hid)
        total = total + con + 0.5 * mlm
        probs.append(torch.stack([torch.softmax(x, 0) for x in lg]).mean(0))
    p_bar = torch.stack(probs).mean(0)
    div = (6 - torch.exp(-(p_bar * p_bar.log()).sum())) / 6
    return total / b + 0.3 * div


def test_objective_equals_contrastive_plus_mlm_on_code_ids_plus_diversity_by_loops():
    obj = _obj(mlm_weight=0.5, diversity_weight=0.3).eval()
    views, batch, m, tokens, patches = _inputs()
    loss = obj(views, batch)
    slow = _slow(obj, m, tokens, patches)
    torch.testing.assert_close(loss.value, slow, rtol=1e-9, atol=1e-10)
    params = [tokens, obj.codebook, obj.code_logits.weight, obj.mlm_head.weight, obj.project.weight]
    for a, b in zip(torch.autograd.grad(loss.value, params), torch.autograd.grad(slow, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # visible positions never reach the loss: moving their patches changes nothing
    base = loss.value.detach()
    for hide, changes in ((0, False), (1, True)):
        moved = patches.clone()
        moved[m.mask == hide] += 1.0
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved})).value
        assert bool(value.detach() != base) == changes


def test_training_draws_gumbel_codes_and_trains_the_codebook():
    obj = _obj().train()
    views, batch, *_ = _inputs()
    loss = obj(views, batch)
    g, = torch.autograd.grad(loss.value, obj.codebook)
    assert g.abs().sum() > 0 and 0 <= float(loss.logs["accuracy"]) <= 1


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "contrastive_plus_mlm")
    assert (obj.temperature, obj.diversity_weight, obj.mlm_weight) == (0.1, 0.1, 1.0)
    assert obj.gumbel_temperature == 2.0 and obj.codebook.shape == (64, 16)
    small = _obj()
    views, batch, m, tokens, patches = _inputs()
    bad = {**batch.extras, keys.RECONSTRUCTION_TARGET: patches[:, :, :3]}
    with pytest.raises(sdk.ShapeError, match="'contrastive_plus_mlm'.*\\[3, 16, 4\\]"):
        small(views, batch.evolve(extras=bad))
    with pytest.raises(sdk.ShapeError, match="'contrastive_plus_mlm'.*saw every token"):
        small(views.evolve(extras={keys.FEATURES: (torch.randn(3, 17, 8, dtype=torch.float64),)}), batch)
    one = masking.random_mask(3, 16, 1 / 16, generator=_g())
    tok = torch.randn(3, 16, 8, dtype=torch.float64)
    with pytest.raises(sdk.ShapeError, match="'contrastive_plus_mlm'.*at least 2"):
        small(views.evolve(extras={keys.FEATURES: (tok,)}), batch.evolve(extras={
            **batch.extras, keys.MASK: one.mask, keys.IDS_RESTORE: one.ids_restore}))
    with pytest.raises(sdk.ConfigError, match="contrastive_plus_mlm: grid \\(3, 3\\)"):
        sdk.create("objective", "contrastive_plus_mlm", grid=(3, 3))
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        sdk.create("objective", "contrastive_plus_mlm", temperature=0.0)
