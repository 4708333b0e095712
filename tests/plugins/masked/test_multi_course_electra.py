"""multi_course_electra (MCL): the three corruption courses checked position by position with
loops (replaced: labels are 'differs from the original'; swapped: a permutation of the counted
tokens in pairs; inserted: deleting the inserted tokens gives back the original prefix), the
corruption count, the detection loss against a per-token loop (value and gradient), no leak
from uncounted positions, defaults and errors."""

import math

import pytest
import torch

import sdk
from plugins.masked.multi_course_electra import detection_loss
from sdk import keys


def _corrupt(courses, b=6, t=20, vocab=7, rate=0.3, pad=True, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(vocab, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    if pad:
        mask[:, t - 4:] = False  # padding at the end
        mask[:, :2] = False  # a prompt
    tf = sdk.create("transform", "multi_course_electra", vocab_size=vocab, rate=rate,
                    courses=courses)
    out, batch = tf(ids, sdk.Batch(index=torch.arange(b), extras={keys.TOKEN_MASK: mask}))
    return ids, mask, out, batch


def test_replaced_course_by_loops():
    ids, mask, out, batch = _corrupt(("replaced",))
    labels = batch.extras[keys.CORRUPTION_LABELS]
    assert torch.equal(batch.extras[keys.TOKEN_IDS], out)
    assert torch.equal(batch.extras[keys.ORIGINAL_TOKEN_IDS], ids)
    assert torch.equal(batch.extras[keys.TOKEN_MASK], mask)
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if not mask[i, t]:
                assert out[i, t] == ids[i, t]  # uncounted positions are never touched
            assert int(labels[i, t]) == (1 if out[i, t] != ids[i, t] else 0)
    changed = (out != ids).sum(1)
    assert bool((changed <= round(0.3 * 14)).all()) and int(changed.sum()) > 0


def test_swapped_course_by_loops():
    ids, mask, out, batch = _corrupt(("swapped",))
    labels = batch.extras[keys.CORRUPTION_LABELS]
    n = round(0.3 * 14)  # 4 positions: two swapped pairs per row
    for i in range(ids.shape[0]):
        assert sorted(out[i].tolist()) == sorted(ids[i].tolist())  # a permutation
        moved = [t for t in range(ids.shape[1]) if out[i, t] != ids[i, t]]
        assert all(mask[i, t] for t in moved)
        assert len(moved) <= n
        for t in range(ids.shape[1]):
            assert int(labels[i, t]) == (2 if out[i, t] != ids[i, t] else 0)
        for t in moved:  # each moved token came from a position holding it, which took its token
            partners = [s for s in moved if out[i, t] == ids[i, s] and out[i, s] == ids[i, t]]
            assert partners
    assert int((labels == 2).sum()) > 0


def test_inserted_course_by_loops():
    ids, mask, out, batch = _corrupt(("inserted",))
    labels, new_mask = batch.extras[keys.CORRUPTION_LABELS], batch.extras[keys.TOKEN_MASK]
    n = round(0.3 * 14)
    t_len = ids.shape[1]
    for i in range(ids.shape[0]):
        kept = [out[i, t].item() for t in range(t_len) if labels[i, t] == 0]
        kept_mask = [bool(new_mask[i, t]) for t in range(t_len) if labels[i, t] == 0]
        assert kept == ids[i, :len(kept)].tolist()  # deleting insertions restores the prefix
        assert kept_mask == mask[i, :len(kept)].tolist()
        inserted = [t for t in range(t_len) if labels[i, t] == 3]
        assert len(inserted) == n and len(kept) == t_len - n
        assert all(new_mask[i, t] for t in inserted)
        assert set(labels[i].tolist()) <= {0, 3}
        # every insertion sits in front of a counted original token, never in the prompt
        for t in inserted:
            after = next(s for s in range(t + 1, t_len) if labels[i, s] == 0)
            assert new_mask[i, after]
        assert min(inserted) >= 2


def test_rows_take_one_course_each_and_rate_default():
    tf = sdk.create("transform", "multi_course_electra")
    assert tf.rate == 0.15 and tf.vocab_size == 100
    assert tf.courses == ("replaced", "swapped", "inserted")
    ids, _, out, batch = _corrupt(("replaced", "swapped", "inserted"), b=60, vocab=50, pad=False)
    labels = batch.extras[keys.CORRUPTION_LABELS]
    seen = set()
    for i in range(60):
        codes = set(labels[i].tolist()) - {0}
        assert len(codes) <= 1
        seen |= codes
    assert seen == {1, 2, 3}


def _views(logits):
    return sdk.Views(embeddings=(torch.zeros(logits.shape[0], 1),),
                     extras={keys.DETECTION_LOGITS: logits})


def _slow_loss(logits, labels, mask):
    total = []
    for i in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1]):
            if mask[i, t]:
                y = 1.0 if labels[i, t] != 0 else 0.0
                p = 1 / (1 + torch.exp(-logits[i, t]))
                terms.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)))
        total.append(sum(terms) / max(len(terms), 1))
    return torch.stack(total)


def test_detection_loss_equals_a_per_token_loop_value_and_gradient():
    _, _, _, batch = _corrupt(("replaced", "swapped", "inserted"), b=4, t=10)
    labels, mask = batch.extras[keys.CORRUPTION_LABELS], batch.extras[keys.TOKEN_MASK]
    logits = torch.randn(labels.shape, dtype=torch.float64, requires_grad=True)
    obj = sdk.create("objective", "multi_course_electra")
    assert obj.weight == 50.0
    loss = obj(_views(logits), batch)
    slow = 50.0 * _slow_loss(logits, labels, mask)
    torch.testing.assert_close(loss.per_sample, slow)
    torch.testing.assert_close(loss.value, slow.mean())
    g_fast, = torch.autograd.grad(loss.value, logits)
    g_slow, = torch.autograd.grad(slow.mean(), logits)
    torch.testing.assert_close(g_fast, g_slow)
    assert bool((g_fast[~mask] == 0).all())  # uncounted positions get no gradient
    # analytic value: logits 0 everywhere give log 2 per counted token
    zero = torch.zeros_like(logits)
    torch.testing.assert_close(detection_loss(zero, labels, mask),
                               torch.full((labels.shape[0],), math.log(2), dtype=torch.float64))


def test_uncounted_positions_do_not_leak_and_perfect_scores_are_logged():
    _, _, _, batch = _corrupt(("replaced", "swapped", "inserted"), b=30)
    labels, mask = batch.extras[keys.CORRUPTION_LABELS], batch.extras[keys.TOKEN_MASK]
    obj = sdk.create("objective", "multi_course_electra", weight=1.0)
    good = torch.where(labels != 0, 8.0, -8.0)
    noisy = torch.where(mask, good, torch.randn(labels.shape) * 100)
    a = obj(_views(good), batch)
    b = obj(_views(noisy), batch)
    torch.testing.assert_close(a.per_sample, b.per_sample)
    assert float(a.value) < 1e-3
    for name in ("replaced", "swapped", "inserted"):
        assert float(a.logs[f"{name}_accuracy"]) == 1.0
    flipped = obj(_views(-good), batch)
    assert float(flipped.logs["inserted_accuracy"]) == 0.0 and float(flipped.value) > 1.0


def test_bad_input_and_parameters():
    with pytest.raises(sdk.ConfigError, match="courses"):
        sdk.create("transform", "multi_course_electra", courses=("masked",))
    with pytest.raises(sdk.ConfigError):
        sdk.create("transform", "multi_course_electra", rate=1.0)
    with pytest.raises(sdk.ConfigError):
        sdk.create("objective", "multi_course_electra", weight=0.0)
    tf = sdk.create("transform", "multi_course_electra")
    with pytest.raises(sdk.ShapeError, match="multi_course_electra.*integer"):
        tf(torch.rand(3, 5), sdk.Batch(index=torch.arange(3)))
    with pytest.raises(sdk.ShapeError, match="token_mask"):
        tf(torch.zeros(3, 5, dtype=torch.long),
           sdk.Batch(index=torch.arange(3), extras={keys.TOKEN_MASK: torch.ones(3, 4)}))
    obj = sdk.create("objective", "multi_course_electra")
    _, _, _, batch = _corrupt(("replaced",))
    with pytest.raises(sdk.ShapeError, match="corruption_labels.*like the logits"):
        obj(_views(torch.randn(6, 19)), batch)
    with pytest.raises(sdk.ShapeError, match="detection_logits.*floating"):
        obj(_views(torch.zeros(6, 20, dtype=torch.long)), batch)


def test_token_ids_in_the_batch_are_the_tokens():
    ids = torch.randint(5, (3, 8))
    tf = sdk.create("transform", "multi_course_electra", vocab_size=5, rate=0.5, courses=("swapped",))
    out, batch = tf(torch.randn(3, 4), sdk.Batch(index=torch.arange(3), extras={keys.TOKEN_IDS: ids}))
    assert torch.equal(batch.extras[keys.ORIGINAL_TOKEN_IDS], ids)
    assert torch.equal(out.sort(1).values, ids.sort(1).values)
