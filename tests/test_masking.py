"""sdk.masking: patches, masks, token bookkeeping, targets and the masked loss, exactly."""

import pytest
import torch

from sdk import masking
from sdk.errors import ConfigError, ShapeError


def _lightly(name):
    """lightly's ``lightly.models.utils.<name>``, compiled from its source alone (the module
    imports torchvision, which may be absent); skips when lightly is not installed."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("lightly")
    if spec is None or spec.origin is None:
        pytest.skip("lightly is not installed")
    source = (Path(spec.origin).parent / "models" / "utils.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"torch": torch, "Tensor": torch.Tensor}
    exec("from typing import Optional, Tuple, Union\n" + ast.get_source_segment(source, node), scope)
    return scope[name]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_patchify_round_trip_and_layout():
    x = torch.randn(3, 2, 6, 4, generator=_g())
    p = masking.patchify(x, 2)
    assert p.shape == (3, 6, 8)
    assert torch.equal(masking.unpatchify(p, 2, (2, 6, 4)), x)
    # patch (row 1, column 0), value at pixel (row 1, column 0) of the patch, channel 1
    assert p[0, 2, (1 * 2 + 0) * 2 + 1] == x[0, 1, 3, 0]
    s = torch.randn(3, 12, 5, generator=_g(1))
    q = masking.patchify_sequence(s, 3)
    assert q.shape == (3, 4, 15) and torch.equal(q[1, 2], s[1, 6:9].flatten())
    assert torch.equal(masking.unpatchify_sequence(q, 3), s)
    with pytest.raises(ShapeError, match="patchify: the image's 6x4 pixels"):
        masking.patchify(x, 3)
    with pytest.raises(ShapeError, match="T a multiple of 5"):
        masking.patchify_sequence(s, 5)


def test_patchify_matches_lightly():
    patchify, unpatchify = _lightly("patchify"), _lightly("unpatchify")
    x = torch.randn(2, 3, 8, 8, generator=_g())
    assert torch.equal(masking.patchify(x, 4), patchify(x, 4))
    p = torch.randn(2, 16, 12, generator=_g(1))
    assert torch.equal(masking.unpatchify(p, 2, (3, 8, 8)), unpatchify(p, 2, 3))


def test_random_mask_counts_and_restore_is_the_identity_on_visible_tokens():
    m = masking.random_mask(5, 16, 0.75, generator=_g())
    assert m.ids_keep.shape == (5, 4) and torch.equal(m.mask.sum(1), torch.full((5,), 12.0))
    # each row's kept ids are distinct and exactly the unmasked positions
    for i in range(5):
        assert sorted(m.ids_keep[i].tolist()) == torch.nonzero(m.mask[i] == 0).flatten().tolist()
    tokens = torch.randn(5, 16, 3, generator=_g(1))
    vis = masking.gather_tokens(tokens, m.ids_keep)
    token = torch.full((3,), -7.0)
    full = masking.restore_tokens(vis, token, m.ids_restore)
    keep = m.mask == 0
    assert torch.equal(full[keep], tokens[keep])
    assert torch.equal(full[~keep], token.expand(int((~keep).sum()), 3))
    # masks differ per sample, and the noise drives them (ranks of the noise)
    assert len({tuple(sorted(r.tolist())) for r in m.ids_keep}) > 1
    noise = torch.rand(5, 16, generator=_g())
    assert torch.equal(m.ids_keep, noise.argsort(1)[:, :4])


def test_random_mask_matches_lightly_random_token_mask():
    random_token_mask = _lightly("random_token_mask")
    torch.manual_seed(3)
    keep, _ = random_token_mask((4, 17), mask_ratio=0.75, mask_class_token=True)
    torch.manual_seed(3)
    ours = masking.random_mask(4, 17, 0.75)
    assert keep.shape[1] == 4 and torch.equal(ours.ids_keep[:, :4], keep)


def test_block_mask_is_contiguous_and_exact():
    m = masking.block_mask(64, (8, 8), 0.5, generator=_g())
    assert torch.equal(m.mask.sum(1), torch.full((64,), 32.0))
    grid = m.mask.view(64, 8, 8)
    # masked patches have masked neighbours far more often than random masks' (0.5)
    same = ((grid[:, 1:] == grid[:, :-1]).float().mean() + (grid[:, :, 1:] == grid[:, :, :-1]).float().mean()) / 2
    r = masking.random_mask(64, 64, 0.5, generator=_g()).mask.view(64, 8, 8)
    rand = ((r[:, 1:] == r[:, :-1]).float().mean() + (r[:, :, 1:] == r[:, :, :-1]).float().mean()) / 2
    assert same > 0.65 and rand < 0.55


def test_score_mask_hides_the_highest_scores_then_random():
    scores = torch.randn(6, 20, generator=_g())
    m = masking.score_mask(scores, 0.5, hard_fraction=1.0, generator=_g(1))
    top = scores.topk(10, dim=1).indices
    assert torch.equal(m.mask.gather(1, top), torch.ones(6, 10))
    half = masking.score_mask(scores, 0.5, hard_fraction=0.4, generator=_g(1))
    assert torch.equal(half.mask.gather(1, scores.topk(4, dim=1).indices), torch.ones(6, 4))
    assert torch.equal(half.mask.sum(1), torch.full((6,), 10.0))
    with pytest.raises(ConfigError, match="hard_fraction"):
        masking.score_mask(scores, 0.5, hard_fraction=2.0)


def test_normalized_target_is_maes_norm_pix():
    p = torch.rand(2, 3, 5, generator=_g())
    t = masking.normalized_patches(p)
    for i in range(2):
        for j in range(3):
            v = p[i, j].double()
            mean, var = float(v.mean()), float(((v - v.mean()) ** 2).sum() / 4)  # unbiased
            torch.testing.assert_close(t[i, j].double(), (v - mean) / (var + 1e-6) ** 0.5, rtol=1e-5, atol=1e-6)


def test_masked_mse_ignores_visible_positions():
    pred, target = torch.randn(4, 6, 3, generator=_g()), torch.randn(4, 6, 3, generator=_g(1))
    mask = masking.random_mask(4, 6, 0.5, generator=_g(2)).mask
    value, per_sample = masking.masked_mse(pred, target, mask)
    expected = [sum(float(((pred[i, j] - target[i, j]) ** 2).mean()) for j in range(6) if mask[i, j])
                / 3 for i in range(4)]
    torch.testing.assert_close(per_sample, torch.tensor(expected))
    torch.testing.assert_close(value, per_sample.mean())
    leaked = pred.clone()
    leaked[mask == 0] += 100.0  # a wrong prediction where nothing is hidden
    assert torch.equal(masking.masked_mse(leaked, target, mask)[0], value)
    moved = pred.clone()
    moved[mask == 1] += 1.0
    assert masking.masked_mse(moved, target, mask)[0] != value


def test_visible_marks_the_input_without_changing_it():
    x = torch.randn(3, 8, generator=_g())
    ids = torch.tensor([[0, 2], [1, 3], [4, 5]])
    v = masking.visible(x, ids)
    plain, got = masking.split_visible(v)
    assert type(plain) is torch.Tensor and torch.equal(plain, x) and got is ids
    assert type(v + 1) is torch.Tensor  # operations drop the mark
    with pytest.raises(ShapeError, match="ids_keep must be integer \\[3, K\\]"):
        masking.visible(x, ids[:2])


def test_sincos_positions():
    pos = masking.sincos_2d(8, (2, 3))
    assert pos.shape == (6, 8)
    # the row half depends on the row only, the column half on the column only
    assert torch.equal(pos[0, :4], pos[2, :4]) and torch.equal(pos[0, 4:], pos[3, 4:])
    angles = torch.tensor([2.0, 2.0 / 100])  # w_k = 10000^(-k / 2), k = 0, 1
    torch.testing.assert_close(masking.sincos_1d(4, torch.tensor([2.0]))[0],
                               torch.cat([angles.sin(), angles.cos()]))
    with pytest.raises(ConfigError, match="divisible by 4"):
        masking.sincos_2d(6, (2, 2))


def test_masked_tokens_reads_one_batch_and_names_the_owner_and_key_at_fault():
    import attrs

    from sdk import keys
    from sdk.transformer import masked_tokens

    g = torch.Generator().manual_seed(0)
    views, batch = masking.example_masked_inputs(3, 16, 0.75, 8, 4, generator=g)
    read = masked_tokens("objective 'x'", views, batch, width=8, length=16, target_dim=4)
    assert read.tokens is views.extras[keys.FEATURES][0]
    assert read.ids_restore is batch.extras[keys.IDS_RESTORE] and read.mask is batch.extras[keys.MASK]
    assert read.target is batch.extras[keys.RECONSTRUCTION_TARGET]
    with pytest.raises(ShapeError, match=r"^objective 'x': Batch.extras\['reconstruction_target'\] "
                                         r"must be the patches \[3, 16, 5\] \(patch_dim\)"):
        masked_tokens("objective 'x'", views, batch, width=8, length=16, target_dim=5)
    short = attrs.evolve(batch, extras={**batch.extras, keys.MASK: batch.extras[keys.MASK][:, :8]})
    with pytest.raises(ShapeError, match=r"^objective 'x': mask \[3, 8\] and ids_restore \[3, 16\]"):
        masked_tokens("objective 'x'", views, short, width=8, length=16, target_dim=4)
    with pytest.raises(ShapeError, match=r"^objective 'x': Views.extras\['features'\] must be"):
        masked_tokens("objective 'x'", views, batch, width=9, length=16, target_dim=4)
