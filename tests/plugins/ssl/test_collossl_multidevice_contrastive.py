"""collossl_multidevice_contrastive: the MMD against a loop over pairs and kernels, the device
weights, the loss against a loop over anchors (value and gradient, the same permutations
replayed), device ranking on synthetic multi-device digits, defaults and errors."""

import math

import pytest
import torch

import sdk
from plugins.ssl.collossl_multidevice_contrastive import SIGMAS, ColloSSL, device_weights, multi_kernel_mmd


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _slow_mmd(x, y, sigmas=SIGMAS):
    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s)) for s in sigmas)

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return max(kxx + kyy - 2 * kxy, 0.0)


def test_mmd_equals_the_loop_over_pairs_and_kernels():
    x = torch.randn(5, 3, generator=_g(), dtype=torch.float64)
    y = torch.randn(4, 3, generator=_g(1), dtype=torch.float64) * 2 + 1
    assert math.isclose(float(multi_kernel_mmd(x, y)), _slow_mmd(x, y), rel_tol=1e-9)
    assert float(multi_kernel_mmd(x, x)) == 0.0


def test_the_closest_device_is_positive_and_negatives_weigh_inverse_mmd():
    positive, w = device_weights(torch.tensor([0.5, 0.2, 0.8]))
    assert int(positive) == 1
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 5.0, 1.25]) / 5.0)
    _, flat = device_weights(torch.tensor([0.5, 0.2, 0.8]), weighted=False)
    assert torch.equal(flat, torch.ones(4))


def _slow_loss(zs, anchor, temperature, seed, weighted=True):
    others = [z for d, z in enumerate(zs) if d != anchor]
    mmd = [_slow_mmd(zs[anchor].detach(), z.detach()) for z in others]
    p = min(range(len(mmd)), key=lambda d: mmd[d])
    w_neg = [1.0 / m if weighted else 1.0 for m in mmd]
    top = max([1.0] + w_neg)
    torch.manual_seed(seed)
    perms = [torch.randperm(zs[0].shape[0]) for _ in others]
    total = 0.0
    b = zs[0].shape[0]
    for i in range(b):
        a = zs[anchor][i]

        def cos(u, v):
            return (u * v).sum() / (u.norm() * v.norm())

        num = (1.0 / top) * torch.exp(cos(a, others[p][i]) / temperature)
        den = num + sum((w_neg[d] / top) * torch.exp(cos(a, others[d][perms[d][i]]) / temperature)
                        for d in range(len(others)))
        total = total - torch.log(num / den)
    return total / b


@pytest.mark.parametrize("anchor,weighted,close", [(0, True, False), (2, True, False),
                                                  (1, False, False), (0, True, True)])
def test_loss_and_gradient_equal_the_loop_over_anchors(anchor, weighted, close):
    """``close``: devices near one another (MMD < 1), so the positive's weight is below 1."""
    base = torch.randn(40, 4, generator=_g(9), dtype=torch.float64)
    zs = [((base + 0.05 * (1 + d) * torch.randn(40, 4, generator=_g(d), dtype=torch.float64)) if close
           else torch.randn(6, 4, generator=_g(d), dtype=torch.float64) * (1 + d)).requires_grad_()
          for d in range(4)]
    obj = ColloSSL(anchor=anchor, weighted=weighted, temperature=0.2)
    torch.manual_seed(3)
    loss = obj(sdk.Views(embeddings=tuple(zs)), sdk.Batch())
    slow = _slow_loss(zs, anchor, 0.2, seed=3, weighted=weighted)
    torch.testing.assert_close(loss.value.double(), slow, rtol=1e-5, atol=1e-7)
    assert not close or float(obj.select(tuple(zs))[2][0]) < 0.5  # the positive weighs < 1
    g = torch.autograd.grad(loss.value, zs)
    g_slow = torch.autograd.grad(slow, zs)
    for a, b in zip(g, g_slow):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_mmd_ranks_distorted_devices_and_picks_the_least_distorted_as_positive():
    """Digits seen by four devices: device d = x + noise of growing sigma_d (device 0, the anchor,
    noiseless); the MMD grows with sigma_d and device 1 (the least noisy) is the positive."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:120], dtype=torch.float32) / 16
    g = _g()
    views = [x] + [x + s * torch.randn(x.shape, generator=g) for s in (0.05, 0.3, 0.8)]
    obj = ColloSSL()
    mmd, positive, weights = obj.select(tuple(views))
    assert int(positive) == 0  # the first non-anchor device (sigma 0.05)
    assert bool((mmd[1:] > mmd[:-1]).all())
    assert bool((weights[2:] < weights[1:-1]).all())  # farther devices weigh less as negatives


def test_defaults_are_the_authors():
    obj = sdk.create("objective", "collossl_multidevice_contrastive")
    assert (obj.temperature, obj.anchor, obj.weighted) == (0.1, 0, True)
    assert obj.sigmas == (1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 100)
    assert obj.batch_coupled is True


def test_errors_name_the_plugin_and_field():
    z = torch.randn(4, 3)
    with pytest.raises(sdk.ShapeError, match="collossl_multidevice_contrastive.*anchor=3.*2 device views"):
        ColloSSL(anchor=3)(sdk.Views(embeddings=(z, z)), sdk.Batch())
    with pytest.raises(sdk.RequirementError, match="collossl_multidevice_contrastive.*2 views"):
        ColloSSL()(sdk.Views(embeddings=(z,)), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="collossl_multidevice_contrastive.*temperature"):
        ColloSSL(temperature=0)
