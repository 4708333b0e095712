"""decoupled_mixup against a written-out loop (value and gradient), its reductions (lambda = 1
and eta = 0 are cross-entropy) and the decoupling: the regulariser's gradient for one mixed
class does not depend on the other mixed class's logit."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def slow(z, y, eta, mode="both", thr=0.5):
    rows = []
    for i in range(z.shape[0]):
        c = range(z.shape[1])
        lse = torch.log(sum(torch.exp(z[i, k]) for k in c))
        total = -sum(y[i, k] * (z[i, k] - lse) for k in c)
        mixed = [k for k in c if y[i, k] > 1e-3]
        if len(mixed) >= 2:
            for k in mixed:
                if mode == "less" and not y[i, k] < thr or mode == "more" and not y[i, k] > thr:
                    continue
                others = sum((torch.exp(z[i, j]) for j in c if j not in mixed), torch.zeros((), dtype=z.dtype))
                total = total - eta * torch.log(torch.exp(z[i, k]) / (torch.exp(z[i, k]) + others))
        rows.append(total)
    return torch.stack(rows)


def mixed_labels(n, c, lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    return lam * F.one_hot(a, c).double() + (1 - lam) * F.one_hot(b, c).double()


def run(obj, z, y):
    return obj(sdk.Views(logits=z), sdk.Batch(targets=y))


@pytest.mark.parametrize(("eta", "mode"), [(0.1, "both"), (1.0, "less"), (0.5, "more")])
def test_matches_loop_value_and_gradient(eta, mode):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = mixed_labels(8, 6, 0.3)  # some pairs share a class: those rows are unmixed
    y[0] = torch.tensor([0.2, 0.3, 0.5, 0, 0, 0], dtype=torch.float64)  # three mixed classes
    got = run(sdk.create("objective", "decoupled_mixup", eta=eta, mode=mode), z, y)
    want = slow(z, y, eta, mode)
    assert torch.allclose(got.per_sample, want, rtol=1e-12)
    g1, g2 = (torch.autograd.grad(t.sum(), z)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


def test_lambda_one_and_eta_zero_are_cross_entropy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    obj = sdk.create("objective", "decoupled_mixup")
    ce = F.cross_entropy(z, y, reduction="none")
    assert torch.allclose(run(obj, z, mixed_labels(6, 5, 1.0)).per_sample,
                          F.cross_entropy(z, mixed_labels(6, 5, 1.0), reduction="none"), rtol=1e-12)
    assert torch.allclose(run(obj, z, y).per_sample, ce, rtol=1e-12)
    soft = mixed_labels(6, 5, 0.6)
    plain = run(sdk.create("objective", "decoupled_mixup", eta=0.0), z, soft).per_sample
    assert torch.allclose(plain, F.cross_entropy(z, soft, reduction="none"), rtol=1e-12)


def test_the_regulariser_decouples_the_mixed_classes():
    from plugins.classification.decoupled_mixup import decoupled_mixup_loss

    z = torch.tensor([[0.3, -0.2, 1.0, 0.4]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.7, 0.3, 0.0, 0.0]], dtype=torch.float64)
    reg = decoupled_mixup_loss(z, y, eta=1.0) - decoupled_mixup_loss(z, y, eta=0.0)
    (g,) = torch.autograd.grad(reg.sum(), z, create_graph=True)
    (cross,) = torch.autograd.grad(g[0, 0], z)
    assert cross[0, 1].item() == 0 and cross[0, 2].item() != 0  # d2/dz_a dz_b = 0; not for a negative
    (g_ce,) = torch.autograd.grad(decoupled_mixup_loss(z, y, eta=0.0).sum(), z, create_graph=True)
    assert torch.autograd.grad(g_ce[0, 0], z)[0][0, 1].item() != 0  # mixup CE couples them


def test_defaults_and_errors():
    obj = sdk.create("objective", "decoupled_mixup")
    assert (obj.eta, obj.mode, obj.threshold) == (0.1, "both", 0.5)
    with pytest.raises(sdk.ShapeError, match=r"decoupled_mixup: Batch.targets .* sum to 1"):
        run(obj, torch.zeros(2, 3), torch.full((2, 3), 0.5))
    with pytest.raises(sdk.ConfigError, match="mode"):
        sdk.create("objective", "decoupled_mixup", mode="all")
