"""Precision, gradient accumulation and clipping in sdk.Trainer."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader

import sdk
from sdk.interfaces import Callback


def _ce():
    return sdk.create("objective", "cross_entropy")


def test_bf16_mixed_runs_under_autocast_and_learns(data, make_mlp):
    dtypes = []

    class Probe(Callback):
        def after_forward(self, state):
            dtypes.append(state.views.logits.dtype)

    loader = DataLoader(data, batch_size=16, shuffle=True)
    enc = make_mlp()
    trainer = sdk.Trainer(enc, _ce(), functools.partial(torch.optim.SGD, lr=0.2),
                          callbacks=[Probe()], precision="bf16-mixed", max_epochs=6,
                          device="cpu", progress=False).fit(loader)
    assert set(dtypes) == {torch.bfloat16}  # the matmuls ran in bfloat16
    assert all(p.dtype == torch.float32 for p in enc.parameters())  # master weights stay fp32
    losses = [r["loss"] for r in trainer.history if r["kind"] == "epoch"]
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.evaluate(loader)["accuracy"] > 0.9


def test_fp16_mixed_needs_cuda(make_mlp):
    with pytest.raises(sdk.ConfigError, match="needs a CUDA device") as err:
        sdk.Trainer(make_mlp(), _ce(), precision="fp16-mixed", device="cpu", max_steps=1)
    assert err.value.param == "precision"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16-mixed needs CUDA")
def test_fp16_mixed_uses_a_grad_scaler_on_cuda(data, make_mlp):
    loader = DataLoader(data, batch_size=16, shuffle=True)
    trainer = sdk.Trainer(make_mlp(), _ce(), functools.partial(torch.optim.SGD, lr=0.2),
                          precision="fp16-mixed", max_epochs=6, device="cuda", progress=False)
    trainer.fit(loader)
    assert isinstance(trainer.scaler, torch.amp.GradScaler)
    assert trainer.scaler.get_scale() > 0
    losses = [r["loss"] for r in trainer.history if r["kind"] == "epoch"]
    assert losses[-1] < 0.5 * losses[0]


def _train(data, make_mlp, *, batch_size, accumulate, steps, **kwargs):
    enc = make_mlp(seed=3)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True)
    sdk.Trainer(enc, _ce(), functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
                accumulate=accumulate, max_steps=steps, progress=False, **kwargs).fit(loader)
    return [p.detach().clone() for p in enc.parameters()]


def test_accumulation_equals_a_larger_batch(data, make_mlp):
    """accumulate=4 with batch B makes the same updates as batch 4B for a mean loss."""
    # 64 items: 4 steps of 16 per epoch either way, same shuffled order (sampler seeded per epoch)
    small = _train(data, make_mlp, batch_size=4, accumulate=4, steps=8)
    large = _train(data, make_mlp, batch_size=16, accumulate=1, steps=8)
    init = [p.detach() for p in make_mlp(seed=3).parameters()]
    for a, b, p0 in zip(small, large, init):
        assert not torch.equal(a, p0)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_accumulation_without_scaling_would_differ(data, make_mlp):
    """The comparison above is sensitive: batch B without accumulation ends elsewhere."""
    small = _train(data, make_mlp, batch_size=4, accumulate=1, steps=8)
    large = _train(data, make_mlp, batch_size=16, accumulate=1, steps=8)
    assert max((a - b).abs().max() for a, b in zip(small, large)) > 1e-3


def test_clipping_bounds_the_update_norm(data, make_mlp):
    enc = make_mlp()
    before = [p.detach().clone() for p in enc.parameters()]
    loader = DataLoader(data, batch_size=64)
    clip = 1e-3
    trainer = sdk.Trainer(enc, _ce(), functools.partial(torch.optim.SGD, lr=1.0),
                          clip_grad_norm=clip, max_steps=1, progress=False).fit(loader)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(enc.parameters(), before)])
    # plain SGD with lr 1: the update is minus the clipped gradient
    assert float(update.norm()) == pytest.approx(clip, rel=1e-4)
    # the pre-clip norm is reported and equals the true gradient norm
    ref = make_mlp()
    x, y = loader.dataset.x, loader.dataset.y
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    true_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    assert float(trainer.grad_norm) == pytest.approx(float(true_norm), rel=1e-5)
    assert float(true_norm) > 10 * clip
