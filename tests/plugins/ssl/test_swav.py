"""SwAV against an explicit float64 loop (the published Sinkhorn-Knopp and swapped
prediction, value and gradient), its prototypes, queue and resume."""

import math

import pytest
import torch

import sdk
from sdk.events import State
from sdk.testing import check_resume


def _sinkhorn(scores, iterations=3, eps=0.05):
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(k)]  # [K, B], as published
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / sum(row) / k for x in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]


def slow(zs, w, temperature=0.1, n_global=2, queue=None):
    """Scalar loops; ``w`` [K, D] prototypes (autograd differentiates the loop)."""
    b, d = zs[0].shape
    k = w.shape[0]

    def unit(z, i):
        norm = torch.sqrt(sum(z[i, c] ** 2 for c in range(d)))
        return [z[i, c] / norm for c in range(d)]

    scores = [[[sum(u[c] * w[j, c] for c in range(d)) for j in range(k)]
               for u in (unit(z, i) for i in range(b))] for z in zs]
    total = 0
    for i in range(n_global):
        plain = [[float(s.detach()) for s in row] for row in scores[i]]
        if queue is not None:
            extra = [[sum(float(queue[i][r, c]) * float(w[j, c]) for c in range(d)) for j in range(k)]
                     for r in range(queue[i].shape[0])]
            plain = extra + plain
        q = _sinkhorn(plain)[-b:]
        sub = 0
        for v in range(len(zs)):
            if v == i:
                continue
            for r in range(b):
                logits = [scores[v][r][j] / temperature for j in range(k)]
                lse = torch.log(sum(torch.exp(x) for x in logits))
                sub = sub - sum(q[r][j] * (logits[j] - lse) for j in range(k)) / b
        total = total + sub / (len(zs) - 1)
    return total / n_global


def _make(**kw):
    torch.manual_seed(0)
    return sdk.create("objective", "swav", **{"dim": 3, "n_prototypes": 4, **kw}).double()


def _views(v=3, n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(v))


@pytest.mark.parametrize("views,temperature", [(2, 0.1), (3, 0.3)])
def test_value_and_gradient_match_the_loop(views, temperature):
    obj = _make(temperature=temperature)
    zs = _views(views)
    loss = obj(sdk.Views(embeddings=zs)).value
    w = obj.prototypes.weight
    want = slow(zs, w, temperature)
    assert loss.item() == pytest.approx(want.item(), rel=1e-9)
    for a, b in zip(torch.autograd.grad(loss, [*zs, w]), torch.autograd.grad(want, [*zs, w])):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_paper_defaults_and_prototypes_stay_unit_vectors():
    obj = sdk.create("objective", "swav")
    assert (obj.temperature, obj.iterations, obj.epsilon, obj.n_global) == (0.1, 3, 0.05, 2)
    assert obj.prototypes.weight.shape == (3000, 128) and obj.queue_length == 0
    small = _make()
    torch.testing.assert_close(small.prototypes.weight.norm(dim=1), torch.ones(4, dtype=torch.float64))
    with torch.no_grad():
        small.prototypes.weight.mul_(3.0)
    small.after_optimizer_step(State(trainer=None))
    torch.testing.assert_close(small.prototypes.weight.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_prototypes_are_frozen_for_the_first_steps():
    obj = _make(freeze_prototypes_steps=2)
    obj(sdk.Views(embeddings=_views(2))).value.backward()
    obj.before_optimizer_step(State(trainer=None, step=1))
    assert obj.prototypes.weight.grad is None
    obj(sdk.Views(embeddings=_views(2))).value.backward()
    obj.before_optimizer_step(State(trainer=None, step=2))
    assert obj.prototypes.weight.grad is not None


def test_the_queue_joins_the_codes_once_full():
    obj = _make(queue_length=4)
    first, second, third = _views(2, seed=1), _views(2, seed=2), _views(2, seed=3)
    plain = _make()
    # not full yet (5 then 10 rows are pushed, keeping the newest 4): the codes are the batch's own
    assert obj(sdk.Views(embeddings=first)).value.item() == pytest.approx(
        plain(sdk.Views(embeddings=first)).value.item(), rel=1e-12)
    queue = [torch.nn.functional.normalize(z.detach(), dim=1)[-4:] for z in first]
    torch.testing.assert_close(obj.queue, torch.stack(queue))
    got = obj(sdk.Views(embeddings=second)).value
    want = slow(second, obj.prototypes.weight, queue=queue)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    obj.eval()  # validation reads the queue but leaves it
    before = obj.queue.clone()
    obj(sdk.Views(embeddings=third))
    assert torch.equal(obj.queue, before)


def test_resume_restores_queue_and_prototypes(tmp_path):
    check_resume(objective=lambda: sdk.create("objective", "swav", dim=4, n_prototypes=6,
                                              queue_length=12), tmp_dir=tmp_path)
