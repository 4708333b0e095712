"""KRR-ST: the dual (kernel) prediction against primal ridge regression (value and gradient),
its interpolation of the synthetic set, the distilled set against real samples on digits, and
the callback's checkpointed state and wiring into a Trainer."""

import functools

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.ssl.krr_ssl_distill import (
    KRRSSLDistill,
    ModelPool,
    PoolModel,
    krr_distill_loss,
    krr_predict,
)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def primal(f_real, f_syn, y_syn, reg):
    """Ridge regression on the features with a bias column: W = (P^T P + lam I)^-1 P^T Y."""
    ps = torch.cat([f_syn, torch.ones(f_syn.shape[0], 1, dtype=f_syn.dtype)], 1)
    pr = torch.cat([f_real, torch.ones(f_real.shape[0], 1, dtype=f_real.dtype)], 1)
    lam = reg * (ps * ps).sum().detach()  # tr(K_ss) = ||P||_F^2
    w = torch.linalg.inv(ps.T @ ps + lam * torch.eye(ps.shape[1], dtype=ps.dtype)) @ ps.T @ y_syn
    return pr @ w


def test_kernel_form_equals_primal_ridge_regression():
    g = torch.Generator().manual_seed(0)
    f_real = torch.randn(7, 4, generator=g, dtype=torch.float64)
    f_syn = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_()
    y_syn = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    y_real = torch.randn(7, 3, generator=g, dtype=torch.float64)
    reg = 0.05
    got = krr_distill_loss(f_real, f_syn, y_syn, y_real, reg)
    want = ((primal(f_real, f_syn, y_syn, reg) - y_real) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    for a, b in zip(torch.autograd.grad(got, (f_syn, y_syn)), torch.autograd.grad(want, (f_syn, y_syn))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_nearly_unregularised_kernel_regression_interpolates_the_synthetic_set():
    g = torch.Generator().manual_seed(1)
    f_syn = torch.randn(4, 9, generator=g, dtype=torch.float64)  # m <= feature width
    y_syn = torch.randn(4, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(krr_predict(f_syn, f_syn, y_syn, 1e-12), y_syn, rtol=1e-6, atol=1e-6)


def _target():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 16))


def _callback(seed=0, **kw):
    params = dict(num_synthetic=20, num_models=4, hidden_dims=(128,), online_iterations=50,
                  outer_lr=1e-2, seed=seed)
    return KRRSSLDistill(**{**params, **kw})


def test_on_digits_the_distilled_set_beats_as_many_real_samples(one_thread):
    """The paper's premise at its smallest: a model pre-trained on 20 distilled samples
    regresses the target's representations of held-out digits better than one pre-trained on
    20 real digits with their true target representations (the set it started from)."""
    data = sdk.data.load("digits", seed=0)
    target = _target()
    with torch.no_grad():
        y_test = target(data.test.x)
    g = torch.Generator().manual_seed(0)
    x = data.train.x[torch.randperm(data.train.x.shape[0], generator=g)]
    cb = _callback(target=target)
    cb.initialize(x, target)
    with torch.no_grad():
        real = F.mse_loss(cb.pretrain(steps=300)(data.test.x), y_test).item()
    for _ in range(150):
        cb.outer_step(x[torch.randint(0, x.shape[0], (256,), generator=g)], target)
    with torch.no_grad():
        distilled = F.mse_loss(cb.pretrain(steps=300)(data.test.x), y_test).item()
    print(f"held-out MSE to the target: 20 real {real:.4f}, 20 distilled {distilled:.4f}")
    assert distilled < 0.7 * real


def test_state_round_trips_and_the_next_step_is_the_same():
    target = _target()
    x = torch.rand(40, 64)
    a = _callback(target=target)
    a.initialize(x, target)
    a.outer_step(x[:16], target)
    b = _callback(target=target)
    b.load_state_dict(a.state_dict())
    la, lb = a.outer_step(x[16:32], target), b.outer_step(x[16:32], target)
    assert la.item() == lb.item()
    assert torch.equal(a.synthetic()[0], b.synthetic()[0]) and torch.equal(a.synthetic()[1], b.synthetic()[1])
    assert a.iterations == b.iterations


def test_pool_models_are_reset_after_their_online_iterations():
    target = _target()
    cb = _callback(target=target, num_models=1, online_iterations=3)
    cb.initialize(torch.rand(30, 64), target)
    while cb.iterations[0] < 3:
        cb.outer_step(torch.rand(8, 64), target)
    cb.outer_step(torch.rand(8, 64), target)  # the model has had its steps: re-initialised
    assert cb.iterations[0] == 0
    assert all(float(m.abs().sum()) == 0 for m in cb.pool.momenta)


def test_the_batched_pool_steps_as_torch_sgd_on_each_model():
    torch.manual_seed(3)
    pool = ModelPool(3, 6, (5, 4), 2, lr=0.1, weight_decay=1e-3, device=torch.device("cpu"))
    models = []
    for i in range(3):
        m = PoolModel(6, (5, 4), 2)
        with torch.no_grad():
            for p, q in zip(m.parameters(), pool.params):
                p.copy_(q[i])
        models.append((m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)))
    x, y = torch.randn(7, 6), torch.randn(7, 2)
    schedule = [[True, True, False], [True, False, True], [False, True, True]]
    for active in schedule:
        pool.step(x, y, torch.tensor(active))
        for (m, opt), on in zip(models, active):
            if on:
                opt.zero_grad()
                F.mse_loss(m(x), y).backward()
                opt.step()
    for i, (m, _) in enumerate(models):
        for p, q in zip(m.parameters(), pool.params):
            torch.testing.assert_close(q[i].detach(), p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pool(x, torch.tensor([i]))[0].detach(), m(x).detach(),
                                   rtol=1e-5, atol=1e-6)


def test_in_a_trainer_the_encoder_is_the_target():
    data = sdk.data.load("digits", seed=0)
    torch.manual_seed(0)
    encoder = sdk.create("encoder", "mlp", in_dim=64, out_dim=10, hidden_dims=(32,))
    cb = _callback(num_models=2, online_iterations=5)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64)
    sdk.Trainer(encoder, sdk.create("objective", "cross_entropy"),
                functools.partial(torch.optim.SGD, lr=0.1), callbacks=[cb], max_steps=3,
                progress=False, device="cpu").fit(loader)
    x_syn, y_syn = cb.synthetic()
    assert x_syn.shape == (20, 64) and y_syn.shape == (20, 10)
    assert not torch.equal(x_syn, data.train.x[:20])  # three outer steps moved it
    assert cb.last_loss is not None and torch.isfinite(cb.last_loss)


def test_bad_inputs_name_the_plugin():
    target = _target()
    small = _callback()
    with pytest.warns(UserWarning, match="krr_ssl_distill: num_synthetic=20.*has 5 inputs"):
        small.initialize(torch.rand(5, 64), target)
    assert small.synthetic()[0].shape == (5, 64)
    cb = _callback()
    cb.initialize(torch.rand(30, 64), target)
    with pytest.raises(sdk.ShapeError, match="krr_ssl_distill.*real inputs of 10 values"):
        cb.outer_step(torch.rand(4, 10), target)
    with pytest.raises(sdk.ConfigError, match="krr_ssl_distill.*hidden_dims"):
        sdk.create("callback", "krr_ssl_distill", hidden_dims=())


def test_defaults_are_the_papers():
    """The authors' settings: 1000 synthetic samples, a pool of 10 models trained
    online for up to 1000 steps with SGD (lr 0.1, weight decay 1e-3), AdamW 1e-3 outside."""
    cb = KRRSSLDistill()
    assert (cb.num_synthetic, cb.num_models, cb.hidden_dims, cb.online_iterations) == (
        1000, 10, (128,), 1000)
    assert (cb.online_lr, cb.online_weight_decay, cb.outer_lr, cb.reg) == (0.1, 1e-3, 1e-3, 1e-6)
