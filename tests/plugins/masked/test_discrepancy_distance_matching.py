"""discrepancy_distance_matching (D-SLA): the three terms against plain loops (value and gradient),
the edit term's zero set, the strongly perturbed view's place, defaults and errors."""

import pytest
import torch

import sdk
from plugins.masked.discrepancy_distance_matching import edit_loss, margin_loss
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _inputs(b=5, v=4, d=3, seed=0):
    g = _g(seed)
    zs = [torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(v)]
    edits = torch.randint(1, 6, (b, v - 1), generator=g).double()
    return zs, edits


def _slow(obj, zs, edits, strong_last=False):
    b, v = zs[0].shape[0], len(zs)
    total = 0.0
    for n in range(b):
        scores = torch.stack([obj.score(zs[i][n]).squeeze() for i in range(v)])
        gd = -(scores[0] - torch.log(torch.exp(scores).sum()))
        d = [torch.sqrt(((zs[i][n] - zs[0][n]) ** 2).sum()) for i in range(1, v)]
        pairs = [(d[i] / edits[n, i] - d[j] / edits[n, j]) ** 2
                 for i in range(v - 1) for j in range(i + 1, v - 1)]
        ed = sum(pairs) / len(pairs)
        weak = v - 1 - strong_last
        hinges = [torch.clamp(obj.margin + d[i] - torch.sqrt(((zs[0][n] - zs[0][m]) ** 2).sum()), min=0)
                  for m in range(b) if m != n for i in range(weak)]
        mg = sum(hinges) / len(hinges)
        total = total + gd + obj.edit_coeff * ed + obj.margin_coeff * mg
    return total / b


@pytest.mark.parametrize("strong_last", [False, True])
def test_loss_equals_the_slow_loop_value_and_gradient(strong_last):
    torch.manual_seed(0)
    obj = sdk.create("objective", "discrepancy_distance_matching", embed_dim=3, margin=2.0,
                     strong_last=strong_last).double()
    zs, edits = _inputs()
    loss = obj(sdk.Views(embeddings=tuple(zs)), sdk.Batch(extras={keys.EDIT_DISTANCE: edits}))
    slow = _slow(obj, zs, edits, strong_last)
    torch.testing.assert_close(loss.value, slow)
    leaves = zs + list(obj.score.parameters())
    for g, w in zip(torch.autograd.grad(loss.value, leaves), torch.autograd.grad(slow, leaves)):
        torch.testing.assert_close(g, w)
    assert loss.logs["margin"] > 0 and loss.logs["edit"] > 0


def test_edit_term_is_zero_exactly_when_distances_are_proportional_to_edits():
    g = _g(1)
    z0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    edits = torch.tensor([[1.0, 2.0, 4.0]] * 4, dtype=torch.float64)
    dirs = torch.nn.functional.normalize(torch.randn(4, 3, 6, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.rand(4, 1, generator=g, dtype=torch.float64) + 0.5  # any per-sample rate
    z = torch.cat([z0[:, None], z0[:, None] + (scale * edits)[..., None] * dirs], 1)
    assert edit_loss(z, edits).abs().max() < 1e-20
    z[:, 2] += 0.1 * dirs[:, 1]
    # one ratio off by 0.1 / 2 = 0.05: pairs (1, 2) and (2, 3) each cost 0.05^2, mean over 3 pairs
    torch.testing.assert_close(edit_loss(z, edits), torch.full((4,), 2 * 0.05 ** 2 / 3, dtype=torch.float64))


def test_margin_is_zero_once_negatives_are_a_margin_farther():
    z0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    z = torch.stack([z0, z0 + torch.tensor([1.0, 0.0], dtype=torch.float64)], 1)
    assert margin_loss(z, 5.0).abs().max() == 0  # 5 + 1 < 10
    # margin 10: sample 0's negatives at 10 and 10 -> hinge 1 each; sample 1's at 10, sqrt(200)
    got = margin_loss(z, 10.0)
    torch.testing.assert_close(got[0], torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(got[1], torch.tensor((1.0 + max(0, 11 - 200 ** 0.5)) / 2, dtype=torch.float64))


def test_defaults_are_the_authors():
    obj = sdk.create("objective", "discrepancy_distance_matching")
    assert (obj.edit_coeff, obj.margin, obj.margin_coeff) == (0.7, 5.0, 0.5)
    assert obj.embed_dim == 300 and obj.strong_last is False and obj.batch_coupled is True
    layers = [m for m in obj.score if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(300, 300), (300, 300), (300, 1)]


def test_errors_name_the_plugin_and_the_field():
    obj = sdk.create("objective", "discrepancy_distance_matching", embed_dim=3).double()
    zs, edits = _inputs()
    with pytest.raises(sdk.RequirementError, match="discrepancy_distance_matching.*edit_distance"):
        obj(sdk.Views(embeddings=tuple(zs)), sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="'discrepancy_distance_matching'.*edit_distance.*\\[5, 3\\]"):
        obj(sdk.Views(embeddings=tuple(zs)), sdk.Batch(extras={keys.EDIT_DISTANCE: edits[:, :2]}))
    with pytest.raises(sdk.ShapeError, match="'discrepancy_distance_matching'.*\\[B, 3\\]"):
        wide = tuple(torch.randn(5, 4, dtype=torch.float64) for _ in range(4))
        obj(sdk.Views(embeddings=wide), sdk.Batch(extras={keys.EDIT_DISTANCE: edits}))
    with pytest.raises(sdk.ShapeError, match="'discrepancy_distance_matching'.*batch of 1"):
        obj(sdk.Views(embeddings=tuple(z[:1] for z in zs)),
            sdk.Batch(extras={keys.EDIT_DISTANCE: edits[:1]}))
    strong = sdk.create("objective", "discrepancy_distance_matching", embed_dim=3, strong_last=True)
    with pytest.raises(sdk.ShapeError, match="'discrepancy_distance_matching'.*4 with strong_last"):
        strong(sdk.Views(embeddings=tuple(z.float() for z in zs[:3])),
               sdk.Batch(extras={keys.EDIT_DISTANCE: edits[:, :2].float()}))
    with pytest.raises(sdk.ConfigError, match="discrepancy_distance_matching: margin must be >= 0"):
        sdk.create("objective", "discrepancy_distance_matching", margin=-1.0)
