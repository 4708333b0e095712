"""scat_simclr_pretext: lambda = 0 is nt_xent exactly; the pretext term is a hand-written
cross-entropy of the head's logits; warm-up, per-view ids and the jigsaw head."""

import math

import pytest
import torch

import sdk
from plugins.contrastive.scat_simclr_pretext import scat_simclr_pretext_loss
from sdk.contrastive import nt_xent_loss
from sdk.events import State


def inputs(seed=0, b=6, dim=12, tiles=1, n_views=2, classes=4):
    g = torch.Generator().manual_seed(seed)
    z = tuple(torch.randn(b, 5, generator=g) for _ in range(n_views))
    shape = (b, dim) if tiles == 1 else (b, tiles, dim)
    h = tuple(torch.randn(*shape, generator=g) for _ in range(n_views))
    ids = torch.randint(classes, (n_views, b), generator=g)
    return z, h, ids


def hand_ce(logits, ids):
    total = 0.0
    for row, t in zip(logits.tolist(), ids.tolist()):
        total += -(row[t] - math.log(sum(math.exp(v) for v in row)))
    return total / len(ids)


def make(**kw):
    kw.setdefault("feature_dim", 12)
    kw.setdefault("hidden", (8, 6))
    return sdk.create("objective", "scat_simclr_pretext", **kw).eval()  # eval: no dropout


def test_zero_weight_is_nt_xent_exactly():
    z, h, ids = inputs()
    obj = make(pretext_weight=0.0)
    loss = obj(sdk.Views(embeddings=z, extras={"features": h}),
               sdk.Batch(extras={"transform_id": ids}))
    assert torch.equal(loss.value, nt_xent_loss(*z, temperature=0.5))


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_pretext_term_is_hand_cross_entropy(weight):
    z, h, ids = inputs(seed=1)
    obj = make(pretext_weight=weight)
    loss = obj(sdk.Views(embeddings=z, extras={"features": h}),
               sdk.Batch(extras={"transform_id": ids}))
    with torch.no_grad():
        logits = torch.cat([obj.head(hv) for hv in h])
    expected = nt_xent_loss(*z, temperature=0.5).item() + weight * hand_ce(logits, ids.reshape(-1))
    assert loss.value.item() == pytest.approx(expected, rel=1e-6)
    assert loss.logs["pretext"].item() == pytest.approx(hand_ce(logits, ids.reshape(-1)), rel=1e-6)
    assert torch.allclose(loss.per_sample.mean(), loss.value)
    functional = scat_simclr_pretext_loss(*z, pretext_logits=logits, transform_ids=ids.reshape(-1),
                                          pretext_weight=weight)
    assert functional.item() == pytest.approx(expected, rel=1e-6)


def test_shared_and_per_view_ids_agree():
    z, h, ids = inputs(seed=2)
    obj = make()
    views = sdk.Views(embeddings=z, extras={"features": h})
    shared = obj(views, sdk.Batch(extras={"transform_id": ids[0]})).value
    stacked = obj(views, sdk.Batch(extras={"transform_id": torch.stack([ids[0], ids[0]])})).value
    tupled = obj(views, sdk.Batch(extras={"transform_id": (ids[0], ids[0])})).value
    other = obj(views, sdk.Batch(extras={"transform_id": ids})).value
    assert torch.equal(shared, stacked) and torch.equal(shared, tupled)
    assert not torch.allclose(shared, other)
    with pytest.raises(sdk.RequirementError, match="transform_id"):
        obj(views, sdk.Batch())


def test_warmup_epochs_switch_the_pretext_term_off():
    z, h, ids = inputs(seed=3)
    obj = make(warmup_epochs=2)
    views, batch = sdk.Views(embeddings=z, extras={"features": h}), sdk.Batch(extras={"transform_id": ids})
    plain = nt_xent_loss(*z, temperature=0.5)
    obj.on_epoch_start(State(epoch=1))
    assert torch.equal(obj(views, batch).value, plain)
    obj.on_epoch_start(State(epoch=2))
    assert obj(views, batch).value.item() > plain.item()
    fresh = make(warmup_epochs=2)
    fresh.load_state_dict(obj.state_dict())
    assert fresh.epoch == 2  # the epoch travels with the checkpoint


def test_jigsaw_head_processes_tiles_like_the_reference():
    z, h, ids = inputs(seed=4, tiles=9, classes=35)
    obj = make(num_transforms=35, tiles=9)
    with torch.no_grad():
        per_tile = [torch.cat([obj.head.tile(hv[:, t]) for t in range(9)], dim=1) for hv in h]
        logits = torch.cat([obj.head.out(obj.head.mix(p)) for p in per_tile])
    loss = obj(sdk.Views(embeddings=z, extras={"features": h}), sdk.Batch(extras={"transform_id": ids}))
    expected = nt_xent_loss(*z, temperature=0.5).item() + 0.3 * hand_ce(logits, ids.reshape(-1))
    assert loss.value.item() == pytest.approx(expected, rel=1e-6)


def test_head_is_trained_through_the_loss():
    z, h, ids = inputs(seed=5)
    obj = make()
    obj(sdk.Views(embeddings=z, extras={"features": h}),
        sdk.Batch(extras={"transform_id": ids})).value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.head.parameters())
    defaults = sdk.create("objective", "scat_simclr_pretext")
    assert (defaults.pretext_weight, defaults.warmup_epochs, defaults.contrastive.temperature) == (
        0.3, 40, 0.5)
