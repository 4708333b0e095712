"""Transitive positives against a breadth-first traversal, the triplet loss against a float64
loop (value and gradient), its zero at a margin-separated embedding, and the objective's graph."""

import itertools

import pytest
import torch

import sdk
from plugins.ssl.transitive_invariance_triplet import transitive_positives, triplet_ranking_loss
from sdk.graph import knn_graph
from sdk.keys import ADJACENCY


def slow_positives(intra, inter):
    """Breadth-first search over states (node, inter edges used <= 1)."""
    n = intra.shape[0]
    out = torch.zeros(n, n, dtype=torch.bool)
    for start in range(n):
        seen, frontier = {(start, 0)}, [(start, 0)]
        while frontier:
            node, used = frontier.pop()
            for nxt in range(n):
                moves = []
                if intra[node, nxt] or intra[nxt, node]:
                    moves.append((nxt, used))
                if (inter[node, nxt] or inter[nxt, node]) and used == 0:
                    moves.append((nxt, 1))
                for m in moves:
                    if m not in seen:
                        seen.add(m)
                        frontier.append(m)
        for node, _ in seen:
            if node != start:
                out[start, node] = True
    return out


@pytest.mark.parametrize("seed", range(4))
def test_transitive_positives_match_a_graph_traversal(seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    intra = torch.rand(n, n, generator=g) < 0.12
    inter = torch.rand(n, n, generator=g) < 0.1
    assert torch.equal(transitive_positives(intra, inter), slow_positives(intra, inter))


def test_the_papers_example_a_b_and_their_views():
    # nodes: A, A' (views of one object), B, B' (of another); A - B an inter-instance edge
    a, a2, b, b2, c = range(5)
    intra = torch.zeros(5, 5, dtype=torch.bool)
    intra[a, a2] = intra[b, b2] = True
    inter = torch.zeros(5, 5, dtype=torch.bool)
    inter[a, b] = True
    pos = transitive_positives(intra, inter)
    assert {(i, j) for i, j in itertools.product(range(5), repeat=2) if pos[i, j]} == {
        (i, j) for i in (a, a2, b, b2) for j in (a, a2, b, b2) if i != j}
    assert not pos[c].any() and not pos[:, c].any()


def slow_triplet(z, positive, neg, margin):
    n = z.shape[0]
    total, count = 0.0, 0

    def dist(i, j):
        return 1 - (z[i] * z[j]).sum() / torch.sqrt((z[i] ** 2).sum() * (z[j] ** 2).sum())

    for i in range(n):
        for j in range(n):
            if positive[i, j]:
                total = total + torch.clamp(dist(i, j) - dist(i, int(neg[i, j])) + margin, min=0)
                count += 1
    return total / count


def test_triplet_loss_matches_the_loop():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_()
    positive = torch.rand(6, 6, generator=g) < 0.4
    neg = torch.randint(0, 6, (6, 6), generator=g)
    got = triplet_ranking_loss(z, positive, neg, 0.5)
    want = slow_triplet(z, positive, neg, 0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])


def test_zero_when_positives_are_closer_than_every_negative_by_the_margin():
    # two groups on orthogonal axes: D = 0 inside a group, 1 across, margin 0.5 is met
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    obj = sdk.create("objective", "transitive_invariance_triplet", neighbors=0)
    views = sdk.Views(embeddings=(z, 1.5 * z))
    adj = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert obj(views, sdk.Batch(extras={ADJACENCY: adj})).value.item() == pytest.approx(0.0, abs=1e-6)
    # one sample moved into the other group: its ranking is violated, the loss grows
    moved = z.clone()
    moved[1] = torch.tensor([0.1, 1.0])
    bad = obj(sdk.Views(embeddings=(moved, 1.5 * moved)), sdk.Batch(extras={ADJACENCY: adj})).value
    assert bad.item() > 0.1


def test_objective_uses_the_view_and_knn_graph():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    zs = tuple(torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    obj = sdk.create("objective", "transitive_invariance_triplet")
    loss = obj(sdk.Views(embeddings=zs))
    # the same draws by hand: kNN (k = 1) of the first view, views of a sample joined
    x = torch.nn.functional.normalize(zs[0].detach().float(), dim=-1)
    ids = torch.arange(5).repeat(2)
    positive = transitive_positives(ids[:, None] == ids[None, :], (knn_graph(x, 1) > 0)[ids][:, ids])
    candidates = ~positive & ~torch.eye(10, dtype=torch.bool)
    torch.manual_seed(0)
    neg = torch.multinomial(candidates.float() + (~candidates.any(1, keepdim=True)).float(), 10,
                            replacement=True)
    assert bool(candidates.gather(1, neg)[positive].all())  # every drawn negative is one
    want = triplet_ranking_loss(torch.cat(zs), positive, neg, 0.5)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-12)
    assert loss.logs["positives_per_node"].item() == positive.float().sum(1).mean().item()


def test_bad_adjacency_names_the_plugin_and_field():
    zs = (torch.randn(4, 3), torch.randn(4, 3))
    obj = sdk.create("objective", "transitive_invariance_triplet")
    with pytest.raises(sdk.ShapeError, match="'transitive_invariance_triplet'.*adjacency.*\\[4, 4\\]"):
        obj(sdk.Views(embeddings=zs), sdk.Batch(extras={ADJACENCY: torch.ones(3, 3)}))
