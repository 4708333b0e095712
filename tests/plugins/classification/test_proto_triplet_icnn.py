"""proto_triplet_icnn against written-out loops of the authors' definitions (value and
gradient); both terms vanish on well-separated classes; ICNN rewards separation."""

import math

import pytest
import torch

import sdk

EPS = 1e-6


def dist(a, b):
    return torch.sqrt(((a - b) ** 2).sum() + EPS)


def slow_triplet(x, y, margin):
    classes = sorted(set(y.tolist()))
    protos = {c: torch.stack([x[i] for i in range(len(y)) if y[i] == c]).mean(0) for c in classes}
    rows = []
    for i in range(len(y)):
        pos = dist(x[i], protos[int(y[i])])
        negs = [dist(x[i], protos[c]) for c in classes if c != int(y[i])]
        rows.append(torch.clamp(pos - min(negs) + margin, min=0) if negs else 0 * pos)
    return torch.stack(rows).mean()


def slow_score(x, y, k):
    n = len(y)
    if k + 2 >= n:
        k = n - 2
    ipc = k + 1
    same_rows, same_counts, other_counts, dc_all = [], [], [], []
    neighbours = []
    for i in range(n):
        ds = sorted(((dist(x[i], x[j]), j) for j in range(n) if j != i), key=lambda t: t[0].item())
        near = ds[:ipc]
        other = [d for d, j in near if y[j] != y[i]]
        nn_dc = min(other, key=lambda t: t.item()) if other else None
        nd = [(d / (nn_dc + EPS) if nn_dc is not None else 0 * d) for d, _ in near[:k]]
        top = max(nd + [torch.ones((), dtype=x.dtype)], key=lambda t: t.item())  # max(max_j nd, 1)
        nd = [v / top for v in nd]
        same = [nd[m] for m in range(k) if y[near[m][1]] == y[i]]
        same_rows.append(sum(same) / (len(same) + EPS) if same else torch.zeros(()))
        same_counts.append(len(same))
        dcs = [near[m][0] for m in range(k) if y[near[m][1]] != y[i]]
        neighbours.append(dcs)
        other_counts.append(len(dcs))
        dc_all += dcs
    lam_s = 1 - sum(same_rows) / (sum(c > 0 for c in same_counts) + EPS)
    top = max(dc_all, key=lambda t: t.item()) if dc_all else torch.zeros(())
    rows = [sum(d / (top + EPS) for d in dcs) / (len(dcs) + EPS) if dcs else torch.zeros(())
            for dcs in neighbours]
    lam_d = abs(sum(rows) / (sum(c > 0 for c in other_counts) + EPS) + (-1 if not dc_all else 0))
    gamma = sum(c / k for c in same_counts) / n if k + 2 < n else 1.0
    return ((lam_s + lam_d) / 2 + gamma) / 2


def grads(f, x):
    x = x.clone().requires_grad_()
    value = f(x)
    return value.detach(), torch.autograd.grad(value, x)[0]


def loss_of(x, y, **kw):
    return sdk.create("objective", "proto_triplet_icnn", **kw)(sdk.Views(embeddings=(x,)),
                                                               sdk.Batch(targets=y))


@pytest.mark.parametrize("n,k", [(12, 4), (6, 4), (9, 2)])
def test_terms_match_loops(n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    got, got_g = grads(lambda t: loss_of(t, y, terms=("triplet",)).value, x)
    want, want_g = grads(lambda t: slow_triplet(t, y, 0.5), x)
    assert torch.allclose(got, want, rtol=1e-10) and torch.allclose(got_g, want_g, rtol=1e-8, atol=1e-12)
    got, got_g = grads(lambda t: loss_of(t, y, terms=("icnn",), k=k).value, x)
    want, want_g = grads(lambda t: -torch.log(slow_score(t, y, k)), x)
    assert torch.allclose(got, want, rtol=1e-10) and torch.allclose(got_g, want_g, rtol=1e-8, atol=1e-12)
    both = loss_of(x, y, k=k)
    assert both.value.item() == pytest.approx((slow_triplet(x, y, 0.5) - torch.log(slow_score(x, y, k))).item() / 2,
                                              rel=1e-10)
    assert both.logs["icnn_score"].item() == pytest.approx(slow_score(x, y, k).item(), rel=1e-10)


def test_both_terms_vanish_on_separated_classes():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    y = torch.arange(18) % 3
    x = centres[y] + 0.1 * torch.randn(18, 2, generator=g, dtype=torch.float64)
    loss = loss_of(x, y)
    assert loss.logs["proto_triplet"].item() == 0.0
    assert loss.logs["icnn_score"].item() == pytest.approx(1.0, abs=1e-5)
    assert loss.value.item() == pytest.approx(0.0, abs=1e-5)
    # closer than the margin: the triplet term is positive, m - (d_neg - d_pos) per sample
    y2 = torch.tensor([0, 1])
    x2 = torch.tensor([[0.0, 0.0], [0.3, 0.0]], dtype=torch.float64)
    want = 0.5 - (math.sqrt(0.09 + EPS) - math.sqrt(EPS))
    assert loss_of(x2, y2, terms=("triplet",)).value.item() == pytest.approx(want, rel=1e-12)


def test_icnn_score_rises_as_classes_separate():
    g = torch.Generator().manual_seed(4)
    y = torch.arange(30) % 3
    noise = torch.randn(30, 2, generator=g, dtype=torch.float64)
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    scores = [loss_of(s * centres[y] + noise, y, terms=("icnn",)).logs["icnn_score"].item()
              for s in (0.0, 2.0, 6.0, 20.0)]
    assert scores == sorted(scores) and scores[-1] > scores[0] + 0.3


def test_errors():
    x = torch.randn(4, 2)
    with pytest.raises(sdk.ConfigError, match="terms must be distinct entries"):
        sdk.create("objective", "proto_triplet_icnn", terms=("triplet", "arcface"))
    with pytest.raises(sdk.ShapeError, match=r"proto_triplet_icnn: Batch.targets must be class ids \[4\]"):
        loss_of(x, torch.zeros(4, 2))
    with pytest.raises(sdk.ConfigError, match="margin"):
        sdk.create("objective", "proto_triplet_icnn", margin=-1.0)
