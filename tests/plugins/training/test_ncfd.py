"""ncfd: the discrepancy equals the characteristic functions written out with complex numbers
sample by sample (and sqrt(alpha) mean_t |Phi_R - Phi_S| for alpha = beta), vanishes for equal
sets and ignores the order of the rows; the objective matches class by class with the real
features detached, the sampling network gets the reversed gradient of the loss (minmax in one
optimizer) and has the authors' shape; and on digits the trained sampler finds frequencies at
which real and synthetic sets differ more than at Gaussian ones."""

import cmath
import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.training.ncfd import SampleNet, ncfd
from sdk.types import Batch, Views


def slow_cf(x, t):
    return [sum(cmath.exp(1j * float(t[k] @ x[j])) for j in range(len(x))) / len(x) for k in range(len(t))]


def slow_ncfd(real, syn, t, alpha, beta):
    total = 0.0
    for pr, ps in zip(slow_cf(real, t), slow_cf(syn, t)):
        amp = (abs(pr) - abs(ps)) ** 2
        pha = max(2 * (abs(pr) * abs(ps) - pr.real * ps.real - pr.imag * ps.imag), 1e-12)
        total += math.sqrt(alpha * amp + beta * pha)
    return total / len(t)


def sets(seed, n=6, m=4, d=3, k=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64),
            torch.randn(k, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.5), (0.9, 0.1), (0.0, 1.0)])
def test_discrepancy_equals_the_complex_loop(alpha, beta):
    real, syn, t = sets(0)
    assert ncfd(real, syn, t, alpha, beta).item() == pytest.approx(slow_ncfd(real, syn, t, alpha, beta), rel=1e-5)


def test_equal_weights_give_the_distance_of_the_characteristic_functions():
    real, syn, t = sets(1)
    dist = sum(abs(a - b) for a, b in zip(slow_cf(real, t), slow_cf(syn, t))) / len(t)
    assert ncfd(real, syn, t, 0.5, 0.5).item() == pytest.approx(math.sqrt(0.5) * dist, rel=1e-5)
    assert ncfd(real, real[torch.randperm(6)], t).item() < 1e-5  # equal sets, any order
    assert ncfd(real, syn, t).item() == pytest.approx(ncfd(real, syn[[3, 1, 0, 2]], t).item(), rel=1e-6)


def test_objective_matches_class_by_class_with_the_real_side_detached():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(10, 8, generator=g, dtype=torch.float64).requires_grad_()
    domain = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0, 0, 1])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])  # classes 2 (real only) and 3 (synthetic only) do not count
    obj = sdk.create("objective", "ncfd", feature_dim=8, num_freqs=5, minmax=False, alpha=0.7, beta=0.3).eval()
    torch.manual_seed(0)
    loss = obj(Views(embeddings=(z,)), Batch(domain=domain, targets=y))
    torch.manual_seed(0)
    t = obj.frequencies(z.device).double()
    zn = F.normalize(z.detach(), dim=1)
    want = (slow_ncfd(zn[[0, 1]], zn[[2, 3]], t, 0.7, 0.3) + slow_ncfd(zn[[4, 5]], zn[[6]], t, 0.7, 0.3)) / 2
    assert loss.value.item() == pytest.approx(want, rel=1e-5)
    assert loss.logs["classes_matched"].item() == 2
    grad, = torch.autograd.grad(loss.value, z)
    assert torch.all(grad[domain == 0] == 0) and grad[[2, 3, 6]].abs().sum() > 0 and torch.all(grad[9] == 0)
    whole = obj(Views(embeddings=(z,)), Batch(domain=domain))  # without classes: the whole sets
    assert whole.logs["classes_matched"].item() == 1


def test_sampling_network_ascends_the_loss_it_reports():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 16, generator=g).requires_grad_()
    batch = Batch(domain=torch.arange(12) % 2, targets=(torch.arange(12) // 2) % 3)
    obj = sdk.create("objective", "ncfd", feature_dim=16, num_freqs=32).eval()
    torch.manual_seed(1)
    loss = obj(Views(embeddings=(z,)), batch)
    params = list(obj.sampling_net.parameters())
    reversed_grads = torch.autograd.grad(loss.value, params, allow_unused=True)
    torch.manual_seed(1)  # the same frequencies, without the reversal
    t = obj.sampling_net(z.device)
    zn = F.normalize(z, dim=1)
    y, d = batch.targets, batch.domain
    direct = sum(ncfd(zn[(y == c) & (d == 0)].detach(), zn[(y == c) & (d == 1)], t) for c in range(3)) / 3
    assert direct.item() == pytest.approx(loss.value.item(), rel=1e-5)
    plain = torch.autograd.grad(direct, params, allow_unused=True)
    for a, b in zip(reversed_grads, plain):
        if b is not None:
            assert torch.allclose(a, -b, rtol=1e-4, atol=1e-7)


def test_sampling_network_has_the_authors_shape_and_the_defaults():
    net = SampleNet(feature_dim=6, num_freqs=64, t_var=1.0).eval()
    t = net(torch.device("cpu"))
    assert t.shape == (64, 6) and t.abs().max() <= 1  # tanh output
    assert torch.equal(t[:4].repeat(16, 1), t)  # 64 // 16 = 4 noise rows, repeated
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 3
    acts = [m for m in net.net if not isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]
    assert [type(m).__name__ for m in acts] == ["LeakyReLU", "LeakyReLU", "Tanh"]
    assert all(m.negative_slope == 0.2 for m in acts[:2])
    few = SampleNet(feature_dim=6, num_freqs=8, t_var=1.0)  # below 16: Gaussian frequencies, no network
    assert few.net is None and few(torch.device("cpu")).shape == (8, 6)
    obj = sdk.create("objective", "ncfd")
    assert (obj.feature_dim, obj.num_freqs, obj.alpha, obj.beta, obj.t_var, obj.minmax) == (64, 64, 0.5, 0.5, 1.0, True)


def test_trained_sampler_finds_discriminative_frequencies_on_digits():
    """The minmax claim: ascending the discrepancy in the sampler's parameters (real digits vs
    a fixed set of other digits) raises the discrepancy above that of Gaussian frequencies
    (measured: 0.032 at Gaussian frequencies, 0.033 at the untrained sampler's, 0.99 after 100
    Adam steps of the sampler, which the reversal turns into ascent)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    real, other = x[y == 3][:60], x[y == 8][:60]
    z = torch.cat([real, other])
    batch = Batch(domain=torch.cat([torch.zeros(60), torch.ones(60)]).long())
    torch.manual_seed(0)
    obj = sdk.create("objective", "ncfd", num_freqs=64)
    opt = torch.optim.Adam(obj.parameters(), 1e-2)
    gauss = sdk.create("objective", "ncfd", num_freqs=64, minmax=False)
    before = torch.stack([gauss(Views(embeddings=(z,)), batch).value for _ in range(20)]).mean()
    for _ in range(100):
        loss = obj(Views(embeddings=(z,)), batch).value
        opt.zero_grad()
        loss.backward()  # the reversal makes this step an ascent for the sampler
        opt.step()
    obj.eval()
    after = torch.stack([obj(Views(embeddings=(z,)), batch).value for _ in range(20)]).mean()
    assert after > 2 * before


def test_bad_inputs_are_named():
    obj = sdk.create("objective", "ncfd", feature_dim=4)
    z = torch.randn(6, 4)
    with pytest.raises(sdk.ShapeError, match=r"'ncfd': Views.embeddings\[0\] must be features \[B, 4\].*\[6, 5\]"):
        obj(Views(embeddings=(torch.randn(6, 5),)), Batch(domain=torch.zeros(6, dtype=torch.long)))
    with pytest.raises(sdk.RequirementError, match="'ncfd' needs Batch.domain"):
        obj(Views(embeddings=(z,)), Batch(targets=torch.zeros(6, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match=r"'ncfd': Batch.targets must lie in \[0, 3\)"):
        sdk.create("objective", "ncfd", feature_dim=4, num_classes=3)(
            Views(embeddings=(z,)), Batch(domain=torch.zeros(6, dtype=torch.long), targets=torch.arange(6)))
    with pytest.raises(sdk.ConfigError, match="alpha must be"):
        sdk.create("objective", "ncfd", alpha=2.0)
