"""homologous_mixing_recognition (MixedAE): the mixing's bookkeeping (equal shares per group
member, every patch used once, unmixing by the sources restores every image, the mask and the
own patches), the homologous contrastive loss against a loop and its analytic value on one-hot
tokens, the objective against loops (value and gradient), no leak from the own patches into the
reconstruction, defaults and errors."""

import math

import pytest
import torch

import sdk
from plugins.masked.homologous_mixing_recognition import homologous_contrastive
from sdk import keys, masking


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _mix(b=8, seed=0, flat=False):
    torch.manual_seed(seed)
    x = torch.rand(b, 1, 8, 8, generator=_g(seed), dtype=torch.float64)
    tf = sdk.create("transform", "homologous_mixing_recognition")
    inp = x.reshape(b, 64) if flat else x
    mixed, batch = tf(inp, sdk.Batch(index=torch.arange(b)))
    return x, mixed, batch


def test_mixing_bookkeeping_by_loops():
    x, mixed, batch = _mix()
    src, mask = batch.extras[keys.MIXING_SOURCE], batch.extras[keys.MASK]
    own = masking.patchify(x, 2)
    got = masking.patchify(mixed, 2)
    b, length = src.shape
    for j in range(b):
        group = j // 4
        counts = {m: 0 for m in range(4 * group, 4 * group + 4)}
        for pos in range(length):
            s = int(src[j, pos])
            counts[s] += 1  # a KeyError: a patch from outside the group
            assert torch.equal(got[j, pos], own[s, pos])
            assert float(mask[j, pos]) == float(s != j)
        assert set(counts.values()) == {length // 4}  # each member holds a quarter of the patches
    for group in range(b // 4):
        rows = range(4 * group, 4 * group + 4)
        for pos in range(length):
            assert sorted(int(src[j, pos]) for j in rows) == list(rows)  # every patch used once
    # unmixing by the sources (the homologous patches) restores every image exactly
    restored = torch.zeros_like(own)
    for j in range(b):
        for pos in range(length):
            restored[int(src[j, pos]), pos] = got[j, pos]
    assert torch.equal(restored, own)
    assert torch.equal(batch.extras[keys.RECONSTRUCTION_TARGET], own)
    first = torch.argsort(batch.extras[keys.IDS_RESTORE], dim=1)[:, :length // 4]
    assert bool((src.gather(1, first) == torch.arange(b)[:, None]).all())  # own patches first
    flat_x, flat_mixed, _ = _mix(flat=True)
    assert flat_mixed.shape == (8, 64)


def _slow_hc(tokens, src, tau):
    b, length, _ = tokens.shape
    total = 0.0
    for i in range(b):
        per = 0.0
        for a in range(length):
            z = [t / t.norm() for t in tokens[i]]
            den = sum(torch.exp(z[a] @ z[k] / tau) for k in range(length) if k != a)
            pos = [p for p in range(length) if p != a and src[i, p] == src[i, a]]
            per = per - sum(torch.log(torch.exp(z[a] @ z[p] / tau) / den) for p in pos) / len(pos)
        total = total + per / length
    return total / b


def test_homologous_contrastive_equals_a_loop_and_its_one_hot_value():
    _, _, batch = _mix(b=4)
    src = batch.extras[keys.MIXING_SOURCE]
    tokens = torch.randn(4, 16, 5, generator=_g(1), dtype=torch.float64).requires_grad_()
    fast = homologous_contrastive(tokens, src, 0.3).mean()
    slow = _slow_hc(tokens, src, 0.3)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(torch.autograd.grad(fast, tokens)[0], torch.autograd.grad(slow, tokens)[0])
    one_hot = torch.nn.functional.one_hot(src, 8).double()  # cos 1 to homologous, 0 to the rest
    k, length, tau = 4, 16, 0.05
    expected = -math.log(math.exp(1 / tau) / ((k - 1) * math.exp(1 / tau) + (length - k)))
    torch.testing.assert_close(homologous_contrastive(one_hot, src, tau),
                               torch.full((4,), expected, dtype=torch.float64))


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "homologous_mixing_recognition",
                      **{"embed_dim": 8, "decoder_dim": 8, "decoder_heads": 2, "decoder_depth": 1,
                         **kw}).double().eval()


def _inputs(seed=0):
    x, _, batch = _mix(b=4, seed=seed)
    tokens = torch.randn(4, 17, 8, generator=_g(seed + 1), dtype=torch.float64).requires_grad_()
    views = sdk.Views(embeddings=(tokens[:, 0].detach(),), extras={keys.FEATURES: (tokens,)})
    return views, batch, tokens


def _slow(obj, tokens, batch, hc_weight, tau):
    src, target = batch.extras[keys.MIXING_SOURCE], batch.extras[keys.RECONSTRUCTION_TARGET]
    ids_restore = batch.extras[keys.IDS_RESTORE]
    total = 0.0
    for i in range(tokens.shape[0]):
        own = [p for p in range(16) if int(src[i, p]) == i]
        order = own + [p for p in range(16) if int(src[i, p]) != i]
        restore = torch.tensor([order.index(p) for p in range(16)])
        assert torch.equal(restore, ids_restore[i])
        visible = torch.stack([tokens[i, 0]] + [tokens[i, 1 + p] for p in own])[None]
        pred = obj.decoder(visible, restore[None])[0]
        err = 0.0
        others = [p for p in range(16) if p not in own]
        for p in others:
            t = target[i, p]
            t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
            err = err + ((pred[p] - t) ** 2).mean()
        total = total + err / len(others)
    return total / tokens.shape[0] + hc_weight * _slow_hc(tokens[:, 1:], src, tau)


def test_objective_equals_reconstruction_and_homologous_contrast_by_loops():
    obj = _obj(hc_weight=0.4, temperature=0.2)
    views, batch, tokens = _inputs()
    loss = obj(views, batch)
    slow = _slow(obj, tokens, batch, 0.4, 0.2)
    # sdk.masking.masked_mse takes the squared error in float32: agreement to ~1e-8
    torch.testing.assert_close(loss.value, slow, rtol=1e-6, atol=1e-8)
    params = [tokens, obj.decoder.embed.weight, obj.decoder.mask_token, obj.decoder.pred.weight]
    for a, b in zip(torch.autograd.grad(loss.value, params), torch.autograd.grad(slow, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the own patches are the decoder's input, never its target
    target = batch.extras[keys.RECONSTRUCTION_TARGET]
    mask = batch.extras[keys.MASK]
    base = loss.logs["reconstruction"]
    for hidden, changes in ((0, False), (1, True)):
        moved = target.clone()
        moved[mask == hidden] += torch.rand(moved[mask == hidden].shape, generator=_g(5), dtype=moved.dtype)
        value = obj(views, batch.evolve(extras={**batch.extras, keys.RECONSTRUCTION_TARGET: moved}))
        assert bool((value.logs["reconstruction"] - base).abs() > 1e-9) == changes


def test_defaults_and_errors_name_the_plugin():
    obj = sdk.create("objective", "homologous_mixing_recognition")
    assert (obj.group_size, obj.temperature, obj.hc_weight, obj.norm_pix_loss) == (4, 0.05, 1.0, True)
    tf = sdk.create("transform", "homologous_mixing_recognition")
    assert (tf.group_size, tf.patch_size, tf.image_shape) == (4, 2, (1, 8, 8))
    with pytest.raises(sdk.ShapeError, match="'homologous_mixing_recognition'.*groups of group_size=4"):
        tf(torch.rand(6, 64), sdk.Batch(index=torch.arange(6)))
    with pytest.raises(sdk.ConfigError, match="homologous_mixing_recognition.*group_size=16"):
        sdk.create("transform", "homologous_mixing_recognition", group_size=16)
    small = _obj()
    views, batch, tokens = _inputs()
    with pytest.raises(sdk.ShapeError, match="'homologous_mixing_recognition'.*\\[B, 17, 8\\]"):
        small(views.evolve(extras={keys.FEATURES: (tokens[:, :5].detach(),)}), batch)
    bad = {**batch.extras, keys.MIXING_SOURCE: batch.extras[keys.MIXING_SOURCE].double()}
    with pytest.raises(sdk.ShapeError, match="'homologous_mixing_recognition'.*'mixing_source'"):
        small(views, batch.evolve(extras=bad))
    with pytest.raises(sdk.RequirementError, match="homologous_mixing_recognition"):
        small(views, sdk.Batch())
