"""decoupled_softmax_xmc against a written-out loop (value and gradient), one positive is
cross-entropy, and a positive's term does not depend on the other positives' scores."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def slow(z, targets, tau, weighted):
    rows = []
    for i in range(z.shape[0]):
        pos = [k for k in range(z.shape[1]) if targets[i, k] > 0]
        neg = [k for k in range(z.shape[1]) if targets[i, k] == 0]
        total = torch.zeros((), dtype=z.dtype)
        for p in pos:
            num = torch.exp(z[i, p] / tau)
            den = num + sum((torch.exp(z[i, k] / tau) for k in neg), torch.zeros((), dtype=z.dtype))
            total = total - (targets[i, p] if weighted else 1.0) * torch.log(num / den)
        rows.append(total / max(len(pos), 1))
    return torch.stack(rows)


def run(obj, z, y):
    return obj(sdk.Views(logits=z), sdk.Batch(targets=y))


@pytest.mark.parametrize(("tau", "weighted"), [(0.05, False), (1.0, True), (0.3, False)])
def test_matches_loop_value_and_gradient(tau, weighted):
    g = torch.Generator().manual_seed(0)
    z = torch.rand(6, 7, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_()
    y = (torch.rand(6, 7, generator=g) < 0.4).double() * torch.rand(6, 7, generator=g, dtype=torch.float64)
    y[0] = 0  # no positive: 0
    y[1] = 1  # no negative: every positive has probability 1
    y[2, :3] = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    obj = sdk.create("objective", "decoupled_softmax_xmc", temperature=tau, weighted=weighted)
    got, want = run(obj, z, y), slow(z, y, tau, weighted)
    assert torch.allclose(got.per_sample, want, rtol=1e-10, atol=1e-14)
    assert got.per_sample[0].item() == 0 and got.per_sample[1].abs().item() < 1e-12
    assert got.value.item() == pytest.approx(want.mean().item(), rel=1e-10)
    g1, g2 = (torch.autograd.grad(t.sum(), z)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-12)


def test_one_positive_is_cross_entropy_and_ids_are_accepted():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    obj = sdk.create("objective", "decoupled_softmax_xmc", temperature=0.5)
    ce = F.cross_entropy(z / 0.5, y, reduction="none")
    assert torch.allclose(run(obj, z, y).per_sample, ce, rtol=1e-12)
    assert torch.allclose(run(obj, z, F.one_hot(y, 4).double()).per_sample, ce, rtol=1e-12)


def test_a_positive_does_not_compete_with_the_other_positives():
    from plugins.classification.decoupled_softmax_xmc import decoupled_softmax_loss

    positive = torch.tensor([[True, True, False, False]])
    only_first = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # weight: positive 1's term
    terms, shared = [], []
    for s2 in (-2.0, 0.0, 3.0):
        s = torch.tensor([[0.5, s2, 0.1, -0.3]], dtype=torch.float64)
        terms.append(decoupled_softmax_loss(s, positive, only_first).item())
        shared.append(-s.log_softmax(1)[0, 0].item())  # the shared-denominator softmax
    assert terms == pytest.approx([terms[0]] * 3, rel=1e-12)
    assert shared[0] < shared[1] < shared[2]


def test_errors():
    obj = sdk.create("objective", "decoupled_softmax_xmc")
    with pytest.raises(sdk.ShapeError, match=r"decoupled_softmax_xmc: Batch.targets"):
        run(obj, torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(sdk.ShapeError, match=r"decoupled_softmax_xmc: Batch.targets .* \[0, 1\]"):
        run(obj, torch.zeros(2, 3), torch.full((2, 3), 2.0))
    with pytest.raises(sdk.ConfigError, match="temperature"):
        sdk.create("objective", "decoupled_softmax_xmc", temperature=0.0)


def test_defaults_are_the_authors():
    obj = sdk.create("objective", "decoupled_softmax_xmc")
    assert (obj.temperature, obj.weighted) == (0.05, False)


def test_class_id_path_is_cross_entropy_at_temperature_in_every_dtype():
    # the closed-form autograd function of class ids against F.cross_entropy(z / tau):
    # gradcheck in float64, then value and gradient parity in float32 and bf16
    from plugins.classification.decoupled_softmax_xmc import _TemperatureCrossEntropy

    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.autograd.gradcheck(lambda z: _TemperatureCrossEntropy.apply(z, y, 0.05), (z,))
    z, y = 2 * torch.randn(64, 300, generator=g), torch.randint(0, 300, (64,), generator=g)
    w = torch.rand(64, generator=g)
    obj = sdk.create("objective", "decoupled_softmax_xmc")  # tau = 0.05: many underflowing exps
    for dtype in (torch.float32, torch.bfloat16):
        zd = z.to(dtype).requires_grad_()
        got = run(obj, zd, y).per_sample
        want = F.cross_entropy(zd.float() / 0.05, y, reduction="none")
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-4)
        g1, g2 = (torch.autograd.grad((w * t).sum(), zd)[0] for t in (got, want))
        assert g1.dtype == dtype
        assert torch.allclose(g1.float(), g2.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                              atol=1e-6)
