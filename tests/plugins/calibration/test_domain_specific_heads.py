"""domain_specific_heads (DRM): each head is the softmax head fitted on its own domain's rows
only; test-time routing picks the lowest-entropy head as a slow loop does; on a synthetic
multi-domain task whose domains carry conflicting spurious signals, routing recovers the
domain and beats one head fitted on the pooled domains on a held-out domain; bad input is
refused by name."""

import math

import pytest
import torch

import sdk
from plugins.calibration.domain_specific_heads import route_by_entropy
from sdk.calibration import fit_linear_head


def multi_domain(n, proportions, seed, block=2):
    """Domain k of K: the label moves block k of the features by +2 (2y - 1) and every other
    block by -0.7 (2y - 1) (a spurious signal that the other domains contradict), plus
    N(0, 0.5^2) noise; ``proportions`` of ``n`` rows per domain."""
    g = torch.Generator().manual_seed(seed)
    k_all = len(proportions)
    xs, ys, ds = [], [], []
    for k, p in enumerate(proportions):
        m = int(n * p)
        y = torch.randint(0, 2, (m,), generator=g)
        s = (2 * y - 1).double()[:, None]
        x = 0.5 * torch.randn(m, k_all * block, generator=g, dtype=torch.float64)
        for j in range(k_all):
            x[:, j * block:(j + 1) * block] += (2.0 if j == k else -0.7) * s
        xs.append(x), ys.append(y), ds.append(torch.full((m,), k))
    return torch.cat(xs), torch.cat(ys), torch.cat(ds)


def slow_route(z):
    picks = []
    for row in z.tolist():
        ents = []
        for head in row:
            top = max(head)
            e = [math.exp(v - top) for v in head]
            p = [v / sum(e) for v in e]
            ents.append(-sum(q * math.log(q) for q in p if q > 0))
        picks.append(min(range(len(ents)), key=lambda k: (ents[k], k)))
    return torch.tensor(picks)


def test_routing_is_the_lowest_entropy_head_by_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(100, 4, 5, generator=g, dtype=torch.float64)
    assert torch.equal(route_by_entropy(z), slow_route(z))
    x, y, d = multi_domain(300, [1, 1, 1], 1)
    cal = sdk.create("calibrator", "domain_specific_heads", num_classes=2).fit(x, y, domains=d)
    heads = cal.head_logits(x)
    pick = slow_route(heads)
    assert torch.equal(cal.route(x), pick)
    assert torch.equal(cal(x), heads[torch.arange(len(x)), pick])


def test_each_head_is_fitted_on_its_own_domain_only():
    x, y, d = multi_domain(300, [1, 1, 1], 2)
    cal = sdk.create("calibrator", "domain_specific_heads", num_classes=2)
    assert (cal.weight_decay, cal.max_iter) == (1e-3, 200)
    cal.fit(x, y, domains=d)
    assert cal.weights.shape == (3, 2, 6)
    for k in range(3):
        w, b = fit_linear_head(x[d == k], y[d == k], 2, weight_decay=1e-3, max_iter=200)
        torch.testing.assert_close(cal.weights[k], w)
        torch.testing.assert_close(cal.biases[k], b)


def test_routing_beats_a_single_head_on_a_held_out_domain():
    x, y, d = multi_domain(300, [1, 1, 1], 3)
    test, y_test, d_test = multi_domain(1000, [0.8, 0.1, 0.1], 4)  # new domain proportions
    drm = sdk.create("calibrator", "domain_specific_heads", num_classes=2).fit(x, y, domains=d)
    single = sdk.create("calibrator", "domain_specific_heads", num_classes=2).fit(
        x, y, domains=torch.zeros_like(d))
    acc = float((drm(test).argmax(1) == y_test).double().mean())
    base = float((single(test).argmax(1) == y_test).double().mean())
    assert float((drm.route(test) == d_test).double().mean()) > 0.95  # the domain is recovered
    assert acc > base + 0.1, (acc, base)


def test_bad_input_is_refused_by_name():
    x, y, d = multi_domain(40, [1, 1], 5)
    cal = sdk.create("calibrator", "domain_specific_heads", num_classes=2, max_iter=5)
    with pytest.raises(sdk.RequirementError, match="domain_specific_heads.*fit needs domains="):
        cal.fit(x, y)
    with pytest.raises(sdk.ShapeError, match="domain_specific_heads.*domains must be domain ids"):
        cal.fit(x, y, domains=d.double())
    with pytest.raises(sdk.ShapeError, match="domain_specific_heads.*every id 0..K-1"):
        cal.fit(x, y, domains=2 * d)
    with pytest.raises(sdk.ShapeError, match=r"domain_specific_heads.*\[0, 2\)"):
        cal.fit(x, y + 1, domains=d)
    with pytest.raises(sdk.NotFittedError, match="domain_specific_heads"):
        cal(x)
    cal.fit(x, y, domains=d)
    with pytest.raises(sdk.ShapeError, match="domain_specific_heads.*fitted on 4"):
        cal(x[:, :3])
    with pytest.raises(TypeError, match="domain_specific_heads"):
        cal(sdk.Logits(x))
