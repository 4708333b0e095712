"""t_jepa: the loss against a per-row, per-subset loop of the predictor (value and gradient), the
targets drawn outside the context only, no gradient into the target branch, the target encoder
seeing the whole row with the linear momentum, the context transform's counts, the paper's
defaults, named errors, and resume through the Trainer."""

import pytest
import torch

import sdk
from plugins.ssl.t_jepa import TJEPA, TJEPAMasking, TJEPATarget, draw_targets
from sdk import keys, masking
from sdk.momentum import linear_momentum
from sdk.testing import check_resume

F, D = 10, 8


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _objective(**kw):
    torch.manual_seed(0)
    return TJEPA(**{"num_features": F, "embed_dim": D, "predictor_dim": 8, "predictor_heads": 2,
                    **kw}).double().eval()


def _inputs(b=3, n_context=3, seed=0):
    m = masking.mask_from_keys(torch.rand(b, F, generator=_g(seed)), F - n_context)
    tokens = torch.randn(b, 1 + n_context, D, generator=_g(seed + 1), dtype=torch.float64).requires_grad_()
    target = torch.randn(b, 1 + F, D, generator=_g(seed + 2), dtype=torch.float64).requires_grad_()
    views = sdk.Views(embeddings=(tokens[:, 0],), extras={keys.FEATURES: (tokens,), keys.TEACHER: (target,)})
    batch = sdk.Batch(index=torch.arange(b), extras={keys.MASK: m.mask, keys.IDS_RESTORE: m.ids_restore})
    return views, batch, m, tokens, target


def _slow(obj, tokens, target, m, seed, num_targets=4, low=0.2, high=0.4):
    """The same draws as the objective's, replayed on the RNG by hand, then the predictor run
    one row and one target subset at a time in float64."""
    torch.manual_seed(seed)
    lo, hi = round(F * low), round(F * high)
    n = lo + round((hi - lo) * float(torch.rand(())))
    noise = torch.rand(num_targets, *m.mask.shape, dtype=torch.float32)
    p = obj.predictor
    total, count = 0.0, 0
    for j in range(num_targets):
        for i in range(tokens.shape[0]):
            hidden = [f for f in range(F) if m.mask[i, f] == 1]
            chosen = sorted(hidden, key=lambda f: float(noise[j, i, f]))[:n]
            keep = [int(f) for f in m.ids_keep[i]]
            h = p.embed(tokens[i])
            rows = [h[0] + p.pos[0, 0]] + [h[1 + c] + p.pos[0, 1 + f] for c, f in enumerate(keep)]
            rows += [p.mask_token + p.pos[0, 1 + f] for f in chosen]
            out = p.pred(p.norm(p.blocks(torch.stack(rows)[None])))[0, 1 + len(keep):]
            for r, f in enumerate(chosen):
                total = total + ((out[r] - target[i, 1 + f].detach()) ** 2).sum()
                count += D
    return total / count


def test_loss_and_gradient_equal_the_loop_over_rows_and_subsets():
    obj = _objective()
    views, batch, m, tokens, target = _inputs()
    torch.manual_seed(5)
    loss = obj(views, batch)
    slow = _slow(obj, tokens, target, m, seed=5)
    torch.testing.assert_close(loss.value.double(), slow, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.per_sample.mean().double(), slow, rtol=1e-6, atol=1e-9)
    g, = torch.autograd.grad(loss.value, tokens, retain_graph=True)
    g_slow, = torch.autograd.grad(slow, tokens)
    torch.testing.assert_close(g, g_slow, rtol=1e-6, atol=1e-9)
    assert g.abs().sum(-1).gt(0).all()  # the regularisation token and every context token are used


def test_the_target_branch_gets_no_gradient_and_only_target_features_count():
    obj = _objective()
    views, batch, m, tokens, target = _inputs()
    torch.manual_seed(1)
    loss = obj(views, batch)
    loss.value.backward()
    assert target.grad is None  # stop-gradient on the target encoder's tokens
    base = loss.value.detach()
    for where, changes in ((m.mask == 0, False), (m.mask == 1, True)):
        moved = target.detach().clone()
        moved[:, 1:][where] += 3.0  # tokens of the context features / of the features outside it
        moved[:, 0] += 3.0 * changes  # the target's regularisation token is never a target
        torch.manual_seed(1)
        value = obj(views.evolve(extras={**views.extras, keys.TEACHER: (moved,)}), batch).value
        assert bool(value != base) == changes


def test_targets_lie_outside_the_context_without_repeats_and_uniformly():
    mask = masking.mask_from_keys(torch.rand(50, F, generator=_g()), 6).mask
    torch.manual_seed(0)
    t = draw_targets(mask, 400, 3)
    assert t.shape == (400, 50, 3)
    assert bool(mask.gather(1, t.reshape(400 * 50, 3).view(400, 50, 3).permute(1, 0, 2).reshape(50, -1)).eq(1).all())
    assert bool((t[..., 0] != t[..., 1]).all() and (t[..., 1] != t[..., 2]).all() and (t[..., 0] != t[..., 2]).all())
    counts = torch.zeros(F).index_add_(0, t[:, 0].reshape(-1), torch.ones(400 * 3))
    hidden = mask[0].bool()  # every hidden feature of row 0 is drawn about 400 * 3 / 6 times
    assert counts[~hidden].sum() == 0 and counts[hidden].min() > 150 and counts[hidden].max() < 250


def test_the_context_transform_draws_one_count_per_batch_in_the_shares():
    tf = TJEPAMasking(num_features=13)
    x = torch.randn(6, 13, generator=_g())
    seen = set()
    torch.manual_seed(0)
    for _ in range(60):
        out, batch = tf(x, sdk.Batch(index=torch.arange(6)))
        plain, ids = masking.split_visible(out)
        assert torch.equal(plain, x)
        k = ids.shape[1]
        seen.add(k)
        assert torch.equal(batch.extras[keys.MASK].sum(1), torch.full((6,), 13.0 - k))
        assert torch.equal(batch.extras[keys.MASK].gather(1, ids), torch.zeros(6, k))
    assert seen == {3, 4, 5}  # round(13 * 0.2) .. round(13 * 0.4)


def test_the_target_encoder_sees_the_whole_row_and_moves_linearly():
    enc = sdk.create("encoder", "sequence_transformer", seq_len=F, in_features=1, embed_dim=D,
                     depth=1, heads=2)
    teacher = sdk.create("teacher", "t_jepa")
    teacher.attach(enc)
    x = torch.randn(4, F, generator=_g())
    marked = masking.visible(x, torch.arange(3).expand(4, 3))
    torch.testing.assert_close(teacher(marked), enc.features(x))
    assert teacher(marked).shape == (4, 1 + F, D) and enc.features(marked).shape == (4, 4, D)
    for p in enc.parameters():
        p.data.zero_()
    for p in teacher.target.parameters():
        p.data.fill_(1.0)
    teacher.update(student=enc, step=25, max_steps=100)  # m = 0.996 + 0.004 / 4 = 0.997
    w = next(teacher.target.parameters())
    torch.testing.assert_close(w, torch.full_like(w, 0.997))
    assert linear_momentum(0.996, 1.0, 100, 100) == 1.0 and linear_momentum(0.996, 1.0, 5, None) == 0.996


def test_defaults_are_the_authors():
    obj = sdk.create("objective", "t_jepa")
    assert (obj.num_targets, obj.min_target_share, obj.max_target_share) == (4, 0.2, 0.4)
    assert obj.predictor.embed.out_features == 64 and len(obj.predictor.blocks.layers) == 2
    assert obj.predictor.blocks.layers[0].self_attn.num_heads == 4
    assert obj.predictor.blocks.layers[0].linear1.out_features == 256 and obj.batch_coupled is False
    tf = sdk.create("transform", "t_jepa")
    assert (tf.min_context_share, tf.max_context_share) == (0.2, 0.4)
    teacher = sdk.create("teacher", "t_jepa")
    assert (teacher.momentum, teacher.final_momentum) == (0.996, 1.0)
    assert TJEPATarget.schedule is linear_momentum


def test_errors_name_t_jepa_and_the_field():
    obj = _objective()
    views, batch, m, tokens, target = _inputs()
    with pytest.raises(sdk.ShapeError, match="'t_jepa'.*teacher.*\\[3, 11, 8\\].*t_jepa teacher"):
        obj(views.evolve(extras={**views.extras, keys.TEACHER: (target[:, 0],)}), batch)
    with pytest.raises(sdk.ShapeError, match="'t_jepa'.*features.*\\[3, 1 \\+ K, 8\\]"):
        obj(views.evolve(extras={**views.extras, keys.FEATURES: (tokens[..., :5],)}), batch)
    with pytest.raises(sdk.ShapeError, match="'t_jepa'.*features.*K < 10"):
        obj(views.evolve(extras={**views.extras, keys.FEATURES: (torch.randn(3, 12, D),)}), batch)
    with pytest.raises(sdk.RequirementError, match="'t_jepa' needs extras\\['mask'\\]"):
        obj(views, sdk.Batch(index=torch.arange(3)))
    crowded, b2, *_ = _inputs(n_context=8)
    with pytest.raises(sdk.ShapeError, match="'t_jepa'.*only 2 of 10 lie outside the context"):
        obj(crowded, b2)
    with pytest.raises(sdk.ConfigError, match="min_target_share=0.5 exceeds max_target_share=0.4"):
        sdk.create("objective", "t_jepa", min_target_share=0.5)
    with pytest.raises(sdk.ConfigError, match="t_jepa.*max_context_share"):
        sdk.create("transform", "t_jepa", max_context_share=1.5)
    with pytest.raises(sdk.ConfigError, match="rounds to an empty subset"):
        sdk.create("transform", "t_jepa", num_features=2)
    with pytest.raises(sdk.ShapeError, match="'t_jepa': x must be floating rows \\[B, 16\\]"):
        sdk.create("transform", "t_jepa")(torch.randn(4, 15), sdk.Batch())
    teacher = sdk.create("teacher", "t_jepa")
    teacher.attach(torch.nn.Linear(F, D))  # no tokens: the objective says what it needs
    flat = teacher(masking.visible(torch.randn(3, F), m.ids_keep))
    with pytest.raises(sdk.ShapeError, match="'t_jepa'.*teacher.*tokens of every feature"):
        obj(views.evolve(extras={**views.extras, keys.TEACHER: (flat.double(),)}), batch)


def _encoder(f=6):
    return sdk.create("encoder", "sequence_transformer", seq_len=f, in_features=1, embed_dim=8,
                      depth=1, heads=2, mlp_ratio=2.0)


def test_trains_with_its_transform_and_teacher_and_resumes_exactly(tmp_path):
    runs = check_resume(objective=lambda: TJEPA(num_features=6, embed_dim=8, predictor_dim=8,
                                                predictor_heads=2, predictor_depth=1),
                        teacher=lambda: sdk.create("teacher", "t_jepa"),
                        transforms=lambda: TJEPAMasking(num_features=6, min_context_share=0.3,
                                                        max_context_share=0.5),
                        encoder=_encoder, tmp_dir=tmp_path)
    moved = [(a - b).abs().max() for a, b in zip(runs.straight.teacher.target.parameters(),
                                                 runs.straight.encoder.parameters())]
    assert max(moved) > 0  # the target is a lagging copy, not the encoder

