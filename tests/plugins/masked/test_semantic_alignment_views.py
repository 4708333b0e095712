"""semantic_alignment_views (Alice's CASA): the cross-attention layer against a per-head loop, the
loss against a plain loop (value and gradient), the centre's update and use, the stationary point
of identical student and teacher tokens, and the authors' defaults."""

import math

import pytest
import torch

import sdk
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "semantic_alignment_views", **{
        "dim": 6, "heads": 2, "head_dim": 3, "hidden_dim": 5, **kw}).double().eval()


def _slow_ca(m, q, kv):
    """One sample: per head h, per query i, softmax_j(q_i Wq_h . kv_j Wk_h / sqrt(d)) weights of
    kv_j Wv_h; heads concatenated, projected, residual + LN, ReLU MLP, residual + LN."""
    d = m.head_dim
    rows = []
    for i in range(q.shape[0]):
        heads = []
        for h in range(m.heads):
            sl = slice(h * d, (h + 1) * d)
            qi = m.w_q.weight[sl] @ q[i]
            logits = torch.stack([qi @ (m.w_k.weight[sl] @ kv[j]) / math.sqrt(d) for j in range(kv.shape[0])])
            w = torch.softmax(logits, 0)
            heads.append(sum(w[j] * (m.w_v.weight[sl] @ kv[j]) for j in range(kv.shape[0])))
        rows.append(q[i] + m.out.weight @ torch.cat(heads))
    x = m.norm1(torch.stack(rows))
    return m.norm2(x + m.fc2(torch.relu(m.fc1(x))))


def _inputs(b=3, n=4, d=6, views=2, seed=0):
    g = _g(seed)
    z = tuple(torch.randn(b, 1 + n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(views))
    t = tuple(torch.randn(b, n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(views))
    return (sdk.Views(embeddings=tuple(x[:, 0].detach() for x in z), extras={keys.FEATURES: z}),
            sdk.Batch(extras={keys.VIEW_TOKENS: t}), z, t)


def test_the_cross_attention_layer_equals_the_per_head_loop():
    obj = _obj()
    q, kv = torch.randn(2, 3, 6, generator=_g(1), dtype=torch.float64), torch.randn(2, 5, 6, generator=_g(2),
                                                                                    dtype=torch.float64)
    out = obj.align(q, kv)
    for i in range(2):
        torch.testing.assert_close(out[i], _slow_ca(obj.align, q[i], kv[i]))


def _slow_loss(obj, z, t, center, ts=0.1, tt=0.01):
    total = 0.0
    per_sample = []
    for i in range(z[0].shape[0]):
        acc = 0.0
        for v in range(len(z)):
            zs = z[v][i, 1:]
            a_s = _slow_ca(obj.align, zs, zs)
            a_t = _slow_ca(obj.align, zs, t[v][i]).detach()
            for l in range(zs.shape[0]):
                p = torch.softmax((a_t[l] - center) / tt, 0)
                acc = acc - (p * torch.log_softmax(a_s[l] / ts, 0)).sum() / zs.shape[0]
        per_sample.append(acc / len(z))
        total = total + acc / len(z)
    return torch.stack(per_sample)


def test_loss_equals_the_loop_value_and_gradient_with_a_centre():
    obj = _obj(student_temp=0.2, teacher_temp=0.05)
    views, batch, z, t = _inputs()
    center = torch.randn(6, generator=_g(5), dtype=torch.float64)
    obj.center.center = center.clone()
    loss = obj(views, batch)
    slow = _slow_loss(obj, z, t, center, 0.2, 0.05)
    torch.testing.assert_close(loss.per_sample, slow)
    params = [*z, *obj.parameters()]
    for a, b in zip(torch.autograd.grad(loss.value, params, retain_graph=True, allow_unused=True),
                    torch.autograd.grad(slow.mean(), params, allow_unused=True)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.grad(loss.value, t, allow_unused=True) == (None, None)
    assert float(torch.autograd.grad(loss.value, z[0])[0][:, 0].abs().sum()) == 0.0  # class token


def test_training_moves_the_centre_towards_the_mean_aligned_teacher_tokens():
    obj = _obj().train()
    obj.align.eval()  # dropout off, the centre's update on
    views, batch, z, t = _inputs()
    obj(views, batch)
    with torch.no_grad():
        a_t = torch.cat([obj.align(z[v][:, 1:], t[v]).reshape(-1, 6) for v in range(2)])
    torch.testing.assert_close(obj.center.center, 0.1 * a_t.mean(0))
    second = obj(views, batch).per_sample
    centred = _slow_loss(obj, z, t, 0.1 * a_t.mean(0))
    torch.testing.assert_close(second, centred)
    obj.eval()
    before = obj.center.center.clone()
    obj(views, batch)
    torch.testing.assert_close(obj.center.center, before)  # evaluation leaves the centre alone


def test_identical_student_and_teacher_tokens_at_one_temperature_are_a_stationary_point():
    """t = z and tau_s = tau_t: a_t = a_s, so the cross-entropy is at its minimum over the
    student's side: zero gradient into the student tokens, and the loss is the aligned tokens'
    entropy."""
    obj = _obj(student_temp=0.5, teacher_temp=0.5)
    views, _, z, _ = _inputs()
    same = sdk.Batch(extras={keys.VIEW_TOKENS: tuple(x[:, 1:].detach() for x in z)})
    loss = obj(views, same)
    grads = torch.autograd.grad(loss.value, z)
    assert max(float(g.abs().max()) for g in grads) < 1e-12
    a = obj.align(z[0][:, 1:], z[0][:, 1:]) / 0.5
    entropy = -(torch.softmax(a, -1) * torch.log_softmax(a, -1)).sum(-1).mean(1)
    a = obj.align(z[1][:, 1:], z[1][:, 1:]) / 0.5
    entropy = 0.5 * (entropy - (torch.softmax(a, -1) * torch.log_softmax(a, -1)).sum(-1).mean(1))
    torch.testing.assert_close(loss.per_sample, entropy)
    other = obj(views, sdk.Batch(extras={keys.VIEW_TOKENS: tuple(torch.randn(x.shape, generator=_g(3),
                                                                               dtype=x.dtype) for x in z)}))
    assert max(float(g.abs().max()) for g in torch.autograd.grad(other.value, z)) > 1e-4


def test_defaults_are_the_authors_and_errors_name_the_plugin():
    obj = sdk.create("objective", "semantic_alignment_views")
    assert (obj.student_temp, obj.teacher_temp, obj.center.momentum) == (0.1, 0.01, 0.9)
    assert (obj.align.heads, obj.align.head_dim, obj.align.fc1.out_features) == (8, 64, 2048)
    assert obj.align.attn_drop.p == 0.1 and obj.batch_coupled is True
    small = _obj()
    views, batch, z, t = _inputs()
    with pytest.raises(sdk.RequirementError, match="semantic_alignment_views.*view_tokens"):
        small(views, sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="semantic_alignment_views.*features'\\]\\[1\\] must be floating "
                                             "student tokens \\[3, 4, 6\\] or \\[3, 5, 6\\]"):
        small(sdk.Views(embeddings=views.embeddings, extras={keys.FEATURES: (z[0], z[1][:, :3])}), batch)
    with pytest.raises(sdk.ShapeError, match="semantic_alignment_views.*view_tokens'\\]\\[0\\].*dim=6"):
        small(views, sdk.Batch(extras={keys.VIEW_TOKENS: (t[0][..., :5], t[1])}))
    with pytest.raises(sdk.ShapeError, match="semantic_alignment_views.*one token tensor per view"):
        small(views, sdk.Batch(extras={keys.VIEW_TOKENS: t[:1]}))
    with pytest.raises(sdk.ConfigError, match="semantic_alignment_views: teacher_temp must be > 0"):
        sdk.create("objective", "semantic_alignment_views", teacher_temp=0)
