"""layerwise_self_expressive_subspace: the loss against loops over layers and entries (value and
gradient), the zero diagonal, the structured norm and the leading-coefficient retention against
loops, the label-free stages and stop, defaults, errors, and clustering a union of subspaces."""

import pytest
import torch

import sdk
from plugins.ssl.layerwise_self_expressive_subspace import LayerwiseSelfExpressiveSubspace, keep_leading
from sdk import keys


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _objective(n=6, **kw):
    return LayerwiseSelfExpressiveSubspace(num_samples=n, num_clusters=2, **kw).double()


def _slow_loss(layers, c):
    total = 0.0
    for h in layers:
        norm = sum(h[i, d] ** 2 for i in range(h.shape[0]) for d in range(h.shape[1]))
        for i in range(h.shape[0]):
            for d in range(h.shape[1]):
                s = h[i, d] - sum(c[i, j] * h[j, d] for j in range(h.shape[0]) if j != i)
                total = total + s ** 2 / norm
    return total


def test_loss_and_gradient_equal_the_loop_and_the_diagonal_stays_zero():
    obj = _objective()
    with torch.no_grad():
        obj.coef.copy_(torch.randn(6, 6, generator=_g(), dtype=torch.float64))
    h1 = torch.randn(4, 5, generator=_g(1), dtype=torch.float64).requires_grad_()
    z = torch.randn(4, 3, generator=_g(2), dtype=torch.float64).requires_grad_()
    index = torch.tensor([5, 0, 3, 2])
    views = sdk.Views(embeddings=(z,), extras={keys.LAYERS: (h1,)})
    loss = obj(views, sdk.Batch(index=index))
    block = obj.coef[index][:, index]  # the diagonal of the block is C_ii: excluded by the loop
    slow = _slow_loss([h1, z], block)
    torch.testing.assert_close(loss.value.double(), slow, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.per_sample.sum(), loss.value)
    grads = torch.autograd.grad(loss.value, (h1, z, obj.coef))
    slow_grads = torch.autograd.grad(slow, (h1, z, obj.coef))
    for g, s in zip(grads, slow_grads):
        torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-9)
    assert torch.equal(grads[2].diagonal(), torch.zeros(6, dtype=torch.float64))
    assert torch.equal(obj.c.diagonal(), torch.zeros(6, dtype=torch.float64))
    assert grads[2][1].abs().sum() == 0  # sample 1 is not in the batch: its row gets nothing


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_stage_one_adds_the_structured_norm_of_different_clusters(alpha):
    obj = _objective(alpha=alpha)
    with torch.no_grad():
        obj.coef.copy_(torch.randn(6, 6, generator=_g(), dtype=torch.float64))
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    obj.theta.copy_((labels[:, None] != labels[None]).double())
    z = torch.randn(6, 3, generator=_g(2), dtype=torch.float64)
    views, batch = sdk.Views(embeddings=(z,)), sdk.Batch(index=torch.arange(6))
    base = obj(views, batch).value
    obj.stage.fill_(1)
    value = obj(views, batch).value
    slow = sum(abs(float(obj.coef[i, j])) * (1 + alpha * (labels[i] != labels[j]).item())
               for i in range(6) for j in range(6) if i != j) / 6
    torch.testing.assert_close(float(value.detach() - base.detach()), slow, rtol=1e-9, atol=1e-12)


def test_keep_leading_keeps_the_k_largest_per_column():
    c = torch.randn(7, 7, generator=_g())
    kept = keep_leading(c, 3)
    for j in range(7):
        order = sorted(range(7), key=lambda i: -abs(float(c[i, j])))
        for i in range(7):
            assert float(kept[i, j]) == (float(c[i, j]) if i in order[:3] else 0.0)


def test_the_relative_error_rule_advances_the_stage_then_stops():
    class Trainer:
        should_stop = False

    state = sdk.events.State(trainer=Trainer())
    obj = _objective(tolerance=1e-3)
    for loss, stage, stop in ((1.0, 0, False), (0.5, 0, False), (0.4999, 1, False),
                              (0.8, 1, False), (0.79999, 1, True)):
        obj.epoch_sum.fill_(2 * loss)
        obj.epoch_count.fill_(2)
        obj.on_epoch_end(state)
        assert (int(obj.stage), state.trainer.should_stop) == (stage, stop)
        assert float(obj.epoch_count) == 0
    assert obj.theta.sum() > 0 and torch.equal(obj.theta, obj.theta.T)  # refreshed clusters


def test_defaults_are_the_catalogues_reconstruction():
    obj = sdk.create("objective", "layerwise_self_expressive_subspace")
    assert (obj.tolerance, obj.alpha, obj.subspace_dim) == (1e-4, 1.0, 4)
    assert obj.batch_coupled is True and int(obj.stage) == 0


def test_errors_name_the_plugin_and_field():
    obj = _objective()
    z = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(sdk.ShapeError, match="layerwise_self_expressive_subspace.*layers'\\]\\[0\\].*\\[4, D\\]"):
        obj(sdk.Views(embeddings=(z,), extras={keys.LAYERS: (torch.randn(3, 2),)}), sdk.Batch(index=torch.arange(4)))
    with pytest.raises(sdk.ShapeError, match="layerwise_self_expressive_subspace.*batch of 8.*num_samples=6"):
        obj(sdk.Views(embeddings=(torch.randn(8, 3),)), sdk.Batch(index=torch.arange(8)))
    with pytest.raises(sdk.RequirementError, match="layerwise_self_expressive_subspace.*index"):
        obj(sdk.Views(embeddings=(z,)), sdk.Batch())
    with pytest.raises(sdk.ConfigError, match="num_clusters=9 exceeds num_samples=6"):
        LayerwiseSelfExpressiveSubspace(num_samples=6, num_clusters=9)
    with pytest.raises(sdk.ConfigError, match="tolerance"):
        sdk.create("objective", "layerwise_self_expressive_subspace", tolerance=0.0)


def _union_of_subspaces(k=5, dim=4, ambient=30, per=50, noise=0.0, seed=0):
    g = _g(seed)
    xs, ys = [], []
    for s in range(k):
        basis = torch.linalg.qr(torch.randn(ambient, dim, generator=g))[0]
        xs.append(torch.randn(per, dim, generator=g) @ basis.T)
        ys.append(torch.full((per,), s))
    x = torch.cat(xs)
    return x + noise * torch.randn(x.shape, generator=g) / ambient ** 0.5, torch.cat(ys)


def _accuracy(pred, truth, k):
    from scipy.optimize import linear_sum_assignment

    m = torch.zeros(k, k)
    m.index_put_((pred, truth), torch.ones(len(pred)), accumulate=True)
    r, c = linear_sum_assignment(-m.numpy())
    return float(m[r, c].sum()) / len(pred)


def test_clusters_a_noisy_union_of_five_four_dimensional_subspaces_and_stops_itself():
    """250 points on 5 random 4-dim subspaces of R^300 plus noise (so the self-expression loss has
    a floor), C learned by Adam on the loss through the Trainer (an identity encoder: the input
    is the one layer): the relative-error rule moves to stage 1 and then stops the fit; the
    clustering accuracy is >= 0.95 and |C| lies within subspaces at least twice as often as
    chance (1/5); measured 0.976 and 0.47."""
    x, y = _union_of_subspaces(ambient=300, noise=0.1)
    obj = LayerwiseSelfExpressiveSubspace(num_samples=250, num_clusters=5, subspace_dim=4, tolerance=3e-3)
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, y), batch_size=250)
    trainer = sdk.Trainer(torch.nn.Identity(), obj, lambda p: torch.optim.Adam(p, lr=1e-2),
                          max_epochs=250, progress=False, device="cpu")
    trainer.fit(loader)
    assert trainer.should_stop and int(obj.stage) == 1 and trainer.state.epoch < 249
    c = obj.c.detach().abs()
    same = (y[:, None] == y[None]).float()
    assert float((c * same).sum() / c.sum()) >= 0.4
    assert _accuracy(obj.cluster(), y, 5) >= 0.95
