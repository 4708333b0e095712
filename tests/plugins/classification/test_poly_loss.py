"""poly_loss against a written-out loop (value and gradient); epsilon = 0 is cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def slow(z, q, eps):
    rows = []
    for i in range(z.shape[0]):
        lse = torch.log(sum(torch.exp(z[i, k]) for k in range(z.shape[1])))
        ce = -sum(q[i, k] * (z[i, k] - lse) for k in range(z.shape[1]))
        pt = sum(q[i, k] * torch.exp(z[i, k] - lse) for k in range(z.shape[1]))
        rows.append(ce + eps * (1 - pt))
    return torch.stack(rows)


def value_and_grad(f, z):
    z = z.clone().requires_grad_()
    v = f(z)
    return v.detach(), torch.autograd.grad(v.sum(), z)[0]


@pytest.mark.parametrize("eps", [1.0, -0.5, 3.0])
def test_matches_loop_for_ids_and_soft_labels(eps):
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    soft = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    obj = sdk.create("objective", "poly_loss", epsilon=eps)
    for target, q in ((y, F.one_hot(y, 4).double()), (soft, soft)):
        got = value_and_grad(lambda t, y=target: obj(sdk.Views(logits=t), sdk.Batch(targets=y)).per_sample, z)
        want = value_and_grad(lambda t, q=q: slow(t, q, eps), z)
        assert torch.allclose(got[0], want[0], rtol=1e-10) and torch.allclose(got[1], want[1], rtol=1e-9)


def test_epsilon_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.tensor([0, 4, 2, 1, 2, 3, 4, 7])
    loss = sdk.create("objective", "poly_loss", epsilon=0.0, ignore_index=7,
                      class_weights=(1.0, 2.0, 0.5, 1.0, 4.0))(sdk.Views(logits=z), sdk.Batch(targets=y))
    want = F.cross_entropy(z, y, ignore_index=7, weight=torch.tensor([1.0, 2.0, 0.5, 1.0, 4.0]).double())
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-12)


def test_default_and_gradient_adds_epsilon_p_t_term():
    # d/dz_y of eps (1 - p_y) = -eps p_y (1 - p_y): Poly-1 pushes the target logit harder than CE
    assert sdk.create("objective", "poly_loss").epsilon == 1.0
    z = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    sdk.create("objective", "poly_loss")(sdk.Views(logits=z), sdk.Batch(targets=torch.tensor([0]))).value.backward()
    assert z.grad[0, 0].item() == pytest.approx(-(1 - 0.5) - 0.25, rel=1e-12)


def test_errors():
    with pytest.raises(sdk.ConfigError, match="epsilon must be"):
        sdk.create("objective", "poly_loss", epsilon=-2.0)
    with pytest.raises(sdk.ShapeError, match=r"poly_loss: Batch.targets must lie in \[0, 3\)"):
        sdk.create("objective", "poly_loss")(sdk.Views(logits=torch.zeros(2, 3)),
                                             sdk.Batch(targets=torch.tensor([0, 3])))
    with pytest.raises(sdk.ShapeError, match="poly_loss: Batch.targets as soft labels must sum to 1"):
        sdk.create("objective", "poly_loss")(sdk.Views(logits=torch.zeros(2, 3)),
                                             sdk.Batch(targets=torch.full((2, 3), 0.3)))
    with pytest.raises(sdk.ConfigError, match="ignore_index applies to class-id targets"):
        sdk.create("objective", "poly_loss", ignore_index=-1)(
            sdk.Views(logits=torch.zeros(2, 3)), sdk.Batch(targets=torch.full((2, 3), 1 / 3)))
