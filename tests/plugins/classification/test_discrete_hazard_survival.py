"""discrete_hazard_survival against a written-out likelihood (value and gradient), the
geometric closed form of a constant hazard, and the C-index against a pair loop."""

import math

import pytest
import torch

import sdk


def sig(x):
    return 1 / (1 + torch.exp(-x))


def slow(a, bins, event):
    rows = []
    for i in range(a.shape[0]):
        t = int(bins[i])
        ll = sum((torch.log(1 - sig(a[i, k])) for k in range(t)), torch.zeros((), dtype=a.dtype))
        h = sig(a[i, t])
        ll = ll + (torch.log(h) if float(event[i]) == 1 else torch.log(1 - h))
        rows.append(-ll)
    return torch.stack(rows)


def run(obj, a, bins, event):
    return obj(sdk.Views(logits=a), sdk.Batch(targets=bins, extras={"event": event}))


def test_matches_likelihood_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bins = torch.tensor([0, 4, 2, 3, 1, 4, 0])
    event = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    got = run(sdk.create("objective", "discrete_hazard_survival"), a, bins, event)
    want = slow(a, bins, event)
    assert torch.allclose(got.per_sample, want, rtol=1e-12)
    g1, g2 = (torch.autograd.grad(t.sum(), a)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-11, atol=1e-14)


def test_constant_hazard_is_geometric():
    h = 0.2
    a = torch.full((4, 6), math.log(h / (1 - h)), dtype=torch.float64)
    bins, event = torch.tensor([0, 3, 3, 5]), torch.tensor([1, 1, 0, 0])
    nll = run(sdk.create("objective", "discrete_hazard_survival"), a, bins, event).per_sample
    want = [-(k * math.log(1 - h) + (math.log(h) if d else math.log(1 - h)))
            for k, d in zip(bins.tolist(), event.tolist())]
    assert nll.tolist() == pytest.approx(want, rel=1e-12)
    from plugins.classification.discrete_hazard_survival import risk

    assert risk(a, 2)[0].item() == pytest.approx(1 - (1 - h) ** 3, rel=1e-12)


def test_concordance_index_matches_a_pair_loop():
    from plugins.classification.discrete_hazard_survival import concordance_index

    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 5, (40,), generator=g).double()  # ties in risk count 1/2
    bins = torch.randint(0, 8, (40,), generator=g)
    event = (torch.rand(40, generator=g) < 0.6).long()
    num = den = 0.0
    for i in range(40):
        for j in range(40):
            if bins[i] < bins[j] and event[i] == 1:
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    assert concordance_index(r, bins, event).item() == pytest.approx(num / den, rel=1e-12)
    assert concordance_index(-bins.double(), bins, torch.ones(40)).item() == 1.0  # earlier = riskier


def test_errors():
    obj = sdk.create("objective", "discrete_hazard_survival")
    with pytest.raises(sdk.ShapeError, match=r"discrete_hazard_survival: Batch.extras\['event'\] must be"):
        run(obj, torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2))
    with pytest.raises(sdk.ShapeError, match=r"discrete_hazard_survival: Batch.targets must lie in \[0, 4\)"):
        run(obj, torch.zeros(3, 4), torch.tensor([0, 4, 1]), torch.zeros(3))
