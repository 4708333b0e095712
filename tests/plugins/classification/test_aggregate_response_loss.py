"""aggregate_response_loss against written-out bag- and instance-level losses (value and
gradient), the paper's identity (instance level = bag level + within-bag variance), and what
each level can and cannot see."""

import pytest
import torch

import sdk


def slow(f, y, bags, rho):
    rows = []
    for i in range(len(f)):
        members = [j for j in range(len(f)) if int(bags[j]) == int(bags[i])]
        f_bag = sum(f[j] for j in members) / len(members)
        y_bag = sum(float(y[j]) for j in members) / len(members)
        rows.append((y_bag - f_bag) ** 2 + rho * (f[i] - f_bag) ** 2)
    return torch.stack(rows)


def run(obj, f, y, bags):
    return obj(sdk.Views(embeddings=(f[:, None],)), sdk.Batch(targets=y, domain=bags))


@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0])
def test_matches_loop_value_and_gradient(rho):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    bags = torch.tensor([4, 0, 4, 2, 0, 4, 7, 2, 0])  # ids need not be contiguous, bags not sorted
    y = torch.randn(9, generator=g, dtype=torch.float64)
    got = run(sdk.create("objective", "aggregate_response_loss", rho=rho), f, y, bags)
    want = slow(f, y, bags, rho)
    assert torch.allclose(got.per_sample, want, rtol=1e-12)
    g1, g2 = (torch.autograd.grad(t.mean(), f)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-15)


def test_instance_level_is_bag_level_plus_the_within_bag_variance():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(12, generator=g, dtype=torch.float64)
    bags = torch.arange(12) % 3
    truth = torch.randn(12, generator=g, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.float64)
    for a in range(3):
        y[bags == a] = truth[bags == a].mean()  # every member carries its bag's mean response
    inst = run(sdk.create("objective", "aggregate_response_loss", rho=1.0), f, y, bags).per_sample
    bag = run(sdk.create("objective", "aggregate_response_loss", rho=0.0), f, y, bags).per_sample
    assert inst.mean().item() == pytest.approx(((y - f) ** 2).mean().item(), rel=1e-12)  # rho = 1: instance level
    variance = torch.stack([(f[bags == a] - f[bags == a].mean()).square().sum() for a in range(3)]).sum()
    assert inst.sum().item() == pytest.approx(bag.sum().item() + variance.item(), rel=1e-12)
    shuffled = f.clone()
    shuffled[bags == 0] = shuffled[bags == 0].flip(0) + torch.tensor([0.5, -0.5, 0.2, -0.2], dtype=torch.float64)
    assert torch.allclose(run(sdk.create("objective", "aggregate_response_loss", rho=0.0), shuffled, y, bags).value,
                          bag.mean())  # the bag level sees only bag means
    assert not torch.allclose(run(sdk.create("objective", "aggregate_response_loss"), shuffled, y, bags).value,
                              inst.mean())


def test_defaults_and_errors():
    obj = sdk.create("objective", "aggregate_response_loss")
    assert obj.rho == 1.0
    f, y = torch.zeros(3), torch.zeros(3)
    with pytest.raises(TypeError, match=r"Batch.domain: expected an integer tensor"):
        run(obj, f, y, torch.zeros(3))
    with pytest.raises(sdk.RequirementError, match=r"needs Batch.domain"):
        obj(sdk.Views(embeddings=(f[:, None],)), sdk.Batch(targets=y))
    with pytest.raises(sdk.ShapeError, match=r"aggregate_response_loss: Views.embeddings\[0\] must be one"):
        obj(sdk.Views(embeddings=(torch.zeros(3, 2),)), sdk.Batch(targets=y, domain=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.ConfigError, match="rho"):
        sdk.create("objective", "aggregate_response_loss", rho=1.5)
