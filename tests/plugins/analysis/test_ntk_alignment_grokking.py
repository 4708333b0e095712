"""ntk_alignment_grokking against a per-sample autograd loop, the centred alignment written with
an explicit centring matrix, its invariances, and the lazy / rich contrast of the paper."""

import copy

import pytest
import torch
from torch import nn

import sdk
from plugins.analysis.ntk_alignment_grokking import (
    centered_kernel_alignment,
    empirical_ntk,
    ntk_target_alignment,
    per_sample_jacobian,
)


def slow_ntk(model, x):
    """``K_ij = sum_c <grad_theta f_c(x_i), grad_theta f_c(x_j)>`` by one backward pass per row
    and output."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []                                        # grads[i][c]: flat gradient
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        grads.append([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                      for c in range(out.numel())])
    n = len(grads)
    return torch.tensor([[sum(float(a @ b) for a, b in zip(grads[i], grads[j])) for j in range(n)]
                         for i in range(n)], dtype=torch.float64)


def slow_cka(k, l):
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    kc, lc = h @ k @ h, h @ l @ h
    return float(torch.trace(kc @ lc) / (torch.trace(kc @ kc).sqrt() * torch.trace(lc @ lc).sqrt()))


def mlp(d_in=3, d_out=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, d_out)).double()


def test_ntk_matches_per_sample_autograd_loop():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for model in (mlp(d_out=2), nn.Sequential(mlp(d_out=1), nn.Flatten(0))):   # [N, 2] and [N] outputs
        assert torch.allclose(empirical_ntk(model, x), slow_ntk(model, x), rtol=1e-10, atol=1e-12)
    frozen = mlp(d_out=2)
    frozen[0].requires_grad_(False)                   # only trainable parameters count
    assert torch.allclose(empirical_ntk(frozen, x), slow_ntk(frozen, x), rtol=1e-10, atol=1e-12)
    assert per_sample_jacobian(frozen, x).shape == (7, 2, 12)


def test_alignment_matches_centring_matrix_formula_and_invariances():
    g = torch.Generator().manual_seed(2)
    j = torch.randn(9, 2, 4, generator=g, dtype=torch.float64)
    y = 3.0 + torch.randn(9, 2, generator=g, dtype=torch.float64)   # non-zero mean: centring matters
    k, l = ntk_from(j), y @ y.T
    a = float(ntk_target_alignment(j, y))
    assert a == pytest.approx(slow_cka(k, l), rel=1e-12)
    assert float(centered_kernel_alignment(7.5 * k, 0.2 * l)) == pytest.approx(a, rel=1e-12)
    assert float(centered_kernel_alignment(k + 4.0, l)) == pytest.approx(a, rel=1e-12)
    assert float(ntk_target_alignment(y[:, :, None], y)) == pytest.approx(1.0, rel=1e-12)  # K = y y^T
    assert float(ntk_target_alignment(-2.0 * y[:, :, None], y)) == pytest.approx(1.0, rel=1e-12)
    z = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    orth = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)   # centred and orthogonal to z
    assert float(ntk_target_alignment(orth[:, None], z)) == pytest.approx(0.0, abs=1e-12)


def ntk_from(j):
    flat = j.reshape(j.shape[0], -1)
    return flat @ flat.T


def test_metric_streams_resumes_and_rejects_bad_input():
    g = torch.Generator().manual_seed(3)
    j = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = j[:, 0] + torch.randn(12, generator=g, dtype=torch.float64)
    metric = sdk.create("metric", "ntk_alignment_grokking")
    metric.update(j[:5], y[:5])
    resumed = sdk.create("metric", "ntk_alignment_grokking")
    resumed.load_state_dict(metric.state_dict())
    for m in (metric, resumed):
        m.update(j[5:], y[5:])
        assert m.compute()["alignment"] == pytest.approx(slow_cka(ntk_from(j), y[:, None] @ y[None]), rel=1e-12)
    with pytest.raises(sdk.errors.ShapeError, match="ntk_alignment_grokking: targets"):
        metric.update(j, y[:, None])
    with pytest.raises(sdk.errors.ShapeError, match="ntk_alignment_grokking: jacobian rows"):
        metric.update(j[:, :3], y)
    with pytest.raises(sdk.errors.ShapeError, match="ntk_alignment_grokking: jacobian"):
        metric.update(j[0], y[:1])


class Centred(nn.Module):
    """``f = alpha (f_theta - f_theta0)``: the paper's output scaling, richness set by ``alpha``."""

    def __init__(self, net, alpha):
        super().__init__()
        self.net, self.alpha = net, alpha
        self.init = copy.deepcopy(net).requires_grad_(False)

    def forward(self, x):
        return self.alpha * (self.net(x) - self.init(x)).squeeze(-1)


def test_alignment_rises_in_rich_training_and_stays_in_lazy_training():
    """The paper's task: x ~ N(0, I_d), y = He_3(beta^T x) / sqrt(6), a two-layer network, full
    batch gradient descent with lr = 0.5 / alpha^2. Small alpha (rich): the NTK turns towards
    y y^T; large alpha (lazy): it stays where it started."""
    g = torch.Generator().manual_seed(0)
    beta = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(100, 8, generator=g, dtype=torch.float64)
    z = x @ (beta / beta.norm())
    y = (z ** 3 - 3 * z) / 6 ** 0.5
    change = {}
    for alpha in (0.5, 10.0):
        torch.manual_seed(1)
        model = Centred(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).double(), alpha)
        before = float(ntk_target_alignment(per_sample_jacobian(model, x), y))
        opt = torch.optim.SGD(model.net.parameters(), lr=0.5 / alpha ** 2)
        for _ in range(600):
            opt.zero_grad()
            (0.5 * (model(x) - y).pow(2).mean()).backward()
            opt.step()
        change[alpha] = float(ntk_target_alignment(per_sample_jacobian(model, x), y)) / before
    assert change[0.5] > 1.5
    assert change[10.0] == pytest.approx(1.0, abs=0.05)


def test_callback_records_the_probe_alignment_and_resumes(tmp_path):
    """In sdk.Trainer runs (6 steps of cross-entropy on 4 classes, batches of 8): the probe set is
    the first 16 rows seen (complete after step 1's forward), the history holds steps 1, 2, 4, 6,
    its last value equals the metric on the final model's Jacobian with one-hot targets, and a
    killed and resumed run records the same history."""
    from sdk.testing import check_resume

    def tracker():
        return [sdk.create("callback", "ntk_alignment_grokking", probe_size=16, every=2)]

    runs = check_resume(objective=lambda: sdk.create("objective", "cross_entropy"),
                        tmp_dir=tmp_path, callbacks=tracker)
    straight, resumed = runs.straight.callbacks[0], runs.resumed.callbacks[0]
    assert [s for s, _ in straight.history] == [1, 2, 4, 6]
    state = straight.state_dict()
    x, y = state["probe_x"], state["probe_targets"]
    assert x.shape == (16, 6)
    model = runs.straight.encoder.eval()
    jac = per_sample_jacobian(model, x)
    onehot = torch.nn.functional.one_hot(y, 4).to(jac.dtype)
    metric = sdk.create("metric", "ntk_alignment_grokking")
    metric.update(jac, onehot)
    assert straight.history[-1][1] == pytest.approx(metric.compute()["alignment"], rel=1e-6)
    assert len({round(a, 9) for _, a in straight.history}) == 4          # the kernel moved
    assert [s for s, _ in resumed.history] == [1, 2, 4, 6]
    assert [a for _, a in resumed.history] == pytest.approx([a for _, a in straight.history], rel=1e-9)
    with pytest.raises(sdk.errors.ConfigError, match="probe_size"):
        sdk.create("callback", "ntk_alignment_grokking", probe_size=1)
