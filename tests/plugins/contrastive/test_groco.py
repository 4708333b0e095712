"""groco: relaxed sorting network against a comparator-by-comparator loop, the hard-sort limit,
the group-ordering behaviour of the loss, and the objective against an anchor-by-anchor loop."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.groco import groco_loss, groco_sorting_loss, odd_even_soft_sort, soft_rank


def _atan(x):
    return torch.atan(x) if torch.is_tensor(x) else math.atan(x)


def _log(x):
    return torch.log(x) if torch.is_tensor(x) else math.log(x)


def slow_sort(values, steepness):
    """Odd-even transposition network on a Python list (floats or differentiable 0-d tensors);
    P[i][p] tracked comparator by comparator."""
    x = list(values)
    n = len(x)
    perm = [[1.0 if i == p else 0.0 for p in range(n)] for i in range(n)]
    for layer in range(n):
        for a in range(layer % 2, n - 1, 2):
            b = a + 1
            alpha = _atan(steepness * (x[b] - x[a])) / math.pi + 0.5
            x[a], x[b] = alpha * x[a] + (1 - alpha) * x[b], (1 - alpha) * x[a] + alpha * x[b]
            for i in range(n):
                pa, pb = perm[i][a], perm[i][b]
                perm[i][a], perm[i][b] = alpha * pa + (1 - alpha) * pb, (1 - alpha) * pa + alpha * pb
    return x, perm


def slow_row_loss(pos, neg, steepness):
    seq = sorted(neg) + sorted(pos)
    k = len(neg)
    _, perm = slow_sort(seq, steepness)
    total = 0.0
    for i in range(len(seq)):
        p_pos = min(max(sum(perm[i][k:]), 0.0), 1.0)
        p_neg = min(max(sum(perm[i][:k]), 0.0), 1.0)
        t = 1.0 if i >= k else 0.0
        bce_pos = -(t * max(_log(p_pos), -100) + (1 - t) * max(_log(1 - p_pos), -100))
        bce_neg = -((1 - t) * max(_log(p_neg), -100) + t * max(_log(1 - p_neg), -100))
        total += (bce_pos + bce_neg) / 2
    return total / len(seq)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_soft_sort_matches_comparator_loop(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    out, perm = odd_even_soft_sort(x, steepness=2.0)
    for row in range(3):
        ref_x, ref_perm = slow_sort(x[row].tolist(), 2.0)
        assert torch.allclose(out[row], torch.tensor(ref_x, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(perm[row], torch.tensor(ref_perm, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out, (x[:, None, :] @ perm).squeeze(1), atol=1e-12)  # sorted = x P
    assert torch.allclose(perm.sum(1), torch.ones(3, n, dtype=torch.float64))  # doubly stochastic
    assert torch.allclose(perm.sum(2), torch.ones(3, n, dtype=torch.float64))


def test_soft_rank_tends_to_hard_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64)
    hard = torch.tensor([[sum(1 for v in row if v < u) for u in row] for row in x.tolist()],
                        dtype=torch.float64)
    assert torch.allclose(soft_rank(x, steepness=1e8), hard, atol=1e-4)
    assert not torch.allclose(soft_rank(x, steepness=1.0), hard, atol=0.1)  # relaxed at steepness 1


def test_loss_minimal_when_positives_rank_first_and_grows_as_a_negative_intrudes():
    pos = torch.tensor([[0.80, 0.90]], dtype=torch.float64)
    losses = []
    for intruder in [0.30, 0.70, 0.85, 0.95]:  # outside, just below, inside, above the positives
        neg = torch.tensor([[0.10, 0.20, 0.25, intruder]], dtype=torch.float64)
        losses.append(groco_sorting_loss(pos, neg, steepness=1.0).item())
        assert losses[-1] == pytest.approx(slow_row_loss(pos[0].tolist(), neg[0].tolist(), 1.0),
                                           rel=1e-10)
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    # a wider margin between the groups lowers the loss further (emphasis on strong pairs)
    wide = groco_sorting_loss(pos, torch.tensor([[-0.9, -0.8, -0.7, -0.6]], dtype=torch.float64))
    assert wide.item() < losses[0]


def slow_objective(views, steepness, k, same_view, stop_gradient=True):
    """Anchor-by-anchor GroCo in float64 0-d tensors (differentiable; compared rows detached
    when ``stop_gradient``)."""
    z = [F.normalize(v, dim=1) for v in views]
    other = [t.detach() if stop_gradient else t for t in z]
    n_views, b = len(z), z[0].shape[0]
    total = 0.0
    for v in range(n_views):
        for i in range(b):
            anchor = z[v][i]
            pos = [anchor @ other[u][i] for u in range(n_views) if u != v]
            cands = [(u, j) for u in range(n_views) for j in range(b)
                     if j != i and (u == v or not same_view)]
            neg = sorted((anchor @ other[u][j] for u, j in cands), key=float, reverse=True)[:k]
            total = total + slow_row_loss(pos, neg, steepness)
    return total / (n_views * b)


@pytest.mark.parametrize("n_views,same_view,k,stop", [(2, True, 3, True), (3, True, 10, True),
                                                      (3, False, 4, False)])
def test_objective_matches_anchor_loop_value_and_gradient(n_views, same_view, k, stop):
    g = torch.Generator().manual_seed(n_views + k)
    views = [torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
             for _ in range(n_views)]
    got = groco_loss(*views, steepness=1.5, topk_negatives=k, same_view_negatives=same_view,
                     stop_gradient=stop)
    ref = slow_objective(views, 1.5, k, same_view, stop)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, views), torch.autograd.grad(ref, views)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_stop_gradient_changes_gradients_not_value():
    g = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(6, 4, generator=g).requires_grad_() for _ in range(2))
    grads, values = [], []
    for stop in (True, False):
        loss = groco_loss(z1, z2, topk_negatives=3, stop_gradient=stop)
        grads.append(torch.autograd.grad(loss, z1)[0])
        values.append(loss.detach())
    assert torch.allclose(values[0], values[1])
    assert not torch.allclose(grads[0], grads[1])


def test_registered_with_paper_defaults():
    obj = sdk.create("objective", "groco")
    assert (obj.steepness, obj.topk_negatives, obj.stop_gradient) == (1.0, 10, True)
    with pytest.raises(sdk.ConfigError, match="steepness"):
        sdk.create("objective", "groco", steepness=0.0)
