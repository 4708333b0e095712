"""prompt_consistency (GOPro): the three terms against plain loops (value and gradient), the
cross-entropy over scaled prompt cosines alone at weights 0, the consistency's invariance to the
prompt features' norms and its zero at equal directions, which views feed which term, defaults
and errors."""

import math

import pytest
import torch

import sdk
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _obj(**kw):
    torch.manual_seed(0)
    obj = sdk.create("objective", "prompt_consistency", **{"embed_dim": 4, **kw}).double()
    with torch.no_grad():  # non-trivial affine parameters of the projector's normalisation
        obj.norm_weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
        obj.norm_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    return obj


def _inputs(b=5, c=3, d=4, v=3, seed=0):
    g = _g(seed)
    zs = tuple(torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    text = tuple(torch.randn(b, c, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(v))
    y = torch.randint(0, c, (b,), generator=g)
    views = sdk.Views(embeddings=zs, extras={keys.CLASS_TEXT_FEATURES: text})
    return views, sdk.Batch(targets=y), zs, text, y


def _unit(x):
    return x / torch.sqrt((x ** 2).sum())


def _slow(obj, zs, text, y, scale=100.0, lam=1.0, mu=0.1, tau=0.1):
    b, c = text[0].shape[:2]
    total = 0.0
    for i in range(b):
        logits = torch.stack([scale * (_unit(zs[0][i]) @ _unit(text[0][i, k])) for k in range(c)])
        ce = -(logits[y[i]] - torch.log(torch.exp(logits).sum()))
        cons = 0.0
        for v in range(1, len(text)):
            cons = cons + sum(((_unit(text[0][i, k]) - _unit(text[v][i, k])) ** 2).sum()
                              for k in range(c)) / (c * text[0].shape[2])
        total = total + ce + lam * cons
    proj = []
    for v in (0, 1):
        rows = [obj.projector(_unit(zs[v][i])) for i in range(b)]
        mean = sum(rows) / b
        var = sum((r - mean) ** 2 for r in rows) / b
        proj.append([_unit((r - mean) / torch.sqrt(var + 1e-5) * obj.norm_weight + obj.norm_bias)
                     for r in rows])
    allrows = proj[0] + proj[1]
    con = 0.0
    for a in range(2 * b):
        pos = (a + b) % (2 * b)
        den = sum(torch.exp(allrows[a] @ allrows[k] / tau) for k in range(2 * b) if k != a)
        con = con - torch.log(torch.exp(allrows[a] @ allrows[pos] / tau) / den)
    return total / b + mu * con / (2 * b)


def test_objective_equals_the_three_terms_by_loops():
    obj = _obj(consistency_weight=0.7, contrastive_weight=0.3, temperature=0.2, logit_scale=20.0)
    views, batch, zs, text, y = _inputs()
    loss = obj(views, batch)
    slow = _slow(obj, zs, text, y, scale=20.0, lam=0.7, mu=0.3, tau=0.2)
    # the shared InfoNCE takes its positive logits in float32: agreement to ~1e-8, not 1e-15
    torch.testing.assert_close(loss.value, slow, rtol=1e-6, atol=1e-8)
    leaves = [*zs, *text, obj.projector.weight, obj.norm_weight, obj.norm_bias]
    for a, b in zip(torch.autograd.grad(loss.value, leaves), torch.autograd.grad(slow, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_defaults_match_the_authors_and_equal_the_loop():
    obj = sdk.create("objective", "prompt_consistency")
    assert (obj.embed_dim, obj.logit_scale, obj.temperature) == (512, 100.0, 0.1)
    assert (obj.consistency_weight, obj.contrastive_weight) == (1.0, 0.1)
    small = _obj()
    views, batch, zs, text, y = _inputs(seed=1)
    torch.testing.assert_close(small(views, batch).value, _slow(small, zs, text, y),
                               rtol=1e-6, atol=1e-8)


def test_weights_zero_leave_the_cross_entropy_over_scaled_prompt_cosines():
    obj = _obj(consistency_weight=0.0, contrastive_weight=0.0)
    views, batch, zs, text, y = _inputs()
    cos = torch.nn.functional.cosine_similarity(zs[0][:, None], text[0], dim=-1)
    torch.testing.assert_close(obj(views, batch).value,
                               torch.nn.functional.cross_entropy(100.0 * cos, y))


def test_consistency_is_zero_for_equal_directions_and_ignores_norms():
    obj = _obj(contrastive_weight=0.0)
    views, batch, zs, text, y = _inputs()
    scaled = (text[0], 3.0 * text[0], 0.5 * text[0])
    same = obj(views.evolve(extras={keys.CLASS_TEXT_FEATURES: scaled}), batch)
    assert float(same.logs["consistency"]) < 1e-20
    # a view of opposite directions: every unit vector differs by 2, squared 4, over d = 4 values
    flipped = (text[0], -text[0], text[0])
    far = obj(views.evolve(extras={keys.CLASS_TEXT_FEATURES: flipped}), batch)
    assert math.isclose(float(far.logs["consistency"]), 4.0 / 4, rel_tol=1e-12)


def test_errors_name_the_plugin():
    obj = _obj()
    views, batch, zs, text, y = _inputs()
    with pytest.raises(sdk.ShapeError, match="'prompt_consistency'.*per view \\(at least 2\\)"):
        obj(views.evolve(extras={keys.CLASS_TEXT_FEATURES: text[:1]}), batch)
    with pytest.raises(sdk.ShapeError, match="'prompt_consistency'.*two views"):
        obj(sdk.Views(embeddings=(*zs, zs[0]), extras={keys.CLASS_TEXT_FEATURES: text}), batch)
    with pytest.raises(sdk.ShapeError, match="'prompt_consistency'.*\\[5, C, 4\\]"):
        obj(views.evolve(extras={keys.CLASS_TEXT_FEATURES: tuple(t[..., :3] for t in text)}), batch)
    with pytest.raises(sdk.ShapeError, match="'prompt_consistency'.*\\[B, 4\\]"):
        obj(sdk.Views(embeddings=tuple(z[:, :3] for z in zs),
                      extras={keys.CLASS_TEXT_FEATURES: text}), batch)
    with pytest.raises(sdk.RequirementError, match="prompt_consistency"):
        obj(views, sdk.Batch())
    one = sdk.Views(embeddings=tuple(z[:1] for z in zs),
                    extras={keys.CLASS_TEXT_FEATURES: tuple(t[:1] for t in text)})
    with pytest.raises(sdk.ShapeError, match="prompt_consistency"):
        obj(one, sdk.Batch(targets=y[:1]))
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        sdk.create("objective", "prompt_consistency", temperature=0.0)
