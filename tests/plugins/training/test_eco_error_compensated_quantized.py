"""eco_error_compensated_quantized: one step equals the paper's update written out (weights
rounded, the error injected into the momentum with c = (1 - beta) / (lr beta)), the injected
error's future contribution to the weights is exactly the error, the weights are exactly on the
grid after every Trainer step, and on least squares with a coarse grid naive quantised SGD
stalls while ECO comes close to the run with full-precision master weights."""

import functools

import pytest
import torch

import sdk
from plugins.training.eco_error_compensated_quantized import adam_injection_coefficient, injection_coefficient
from sdk.events import State
from sdk.quantization import Grid


def test_one_step_equals_the_update_written_out():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    eco = sdk.create("callback", "eco_error_compensated_quantized", bits=4)
    for _ in range(3):
        layer(torch.randn(8, 5)).square().mean().backward()
        opt.step()
        stepped = layer.weight.detach().clone()
        buf = opt.state[layer.weight]["momentum_buffer"].clone()
        bias = layer.bias.detach().clone()
        eco.after_optimizer_step(State(model=layer, optimizer=opt))
        grid = Grid.fit(stepped, 4)
        want = grid.round(stepped)
        assert torch.equal(layer.weight.detach(), want)
        c = (1 - 0.9) / (0.1 * 0.9)
        assert torch.allclose(opt.state[layer.weight]["momentum_buffer"], buf - c * (stepped - want))
        assert torch.equal(layer.bias.detach(), bias)  # biases stay in full precision
        opt.zero_grad()


def test_the_injected_error_comes_back_in_full():
    """With no gradient after the injection, momentum alone adds back lr c e sum_k beta^k = e."""
    lr, beta = 0.05, 0.8
    e = torch.tensor([0.3, -0.2])
    w = torch.zeros(2)
    m = -injection_coefficient(lr, beta) * e
    for _ in range(400):
        m = beta * m
        w = w - lr * m
    assert torch.allclose(w, e, atol=1e-6)


def test_weights_are_on_the_grid_after_every_trainer_step():
    from sdk.data import IndexedDataset

    class OnGrid(sdk.interfaces.Callback):
        def __init__(self, eco):
            self.eco, self.checked, self.losses = eco, 0, []

        def after_optimizer_step(self, state):  # runs after ECO's (listed later)
            for p in state.model.parameters():
                if p.dim() >= 2:
                    assert bool(self.eco.last_grids[id(p)].contains(p.detach()).all())
                    self.checked += 1
            self.losses.append(float(state.loss.value.detach()))

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    data = IndexedDataset(x, (x[:, 0] > 0).long())
    eco = sdk.create("callback", "eco_error_compensated_quantized", bits=4, group_size=2,
                     rounding="stochastic")
    seen = OnGrid(eco)
    sdk.Trainer(sdk.create("encoder", "mlp", in_dim=6, out_dim=2, hidden_dims=(8,)),
                sdk.create("objective", "cross_entropy"),
                functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9), callbacks=[eco, seen],
                max_steps=30, progress=False, device="cpu").fit(torch.utils.data.DataLoader(data, batch_size=16))
    assert seen.checked >= 30 * 2
    assert sum(seen.losses[-5:]) < 0.7 * sum(seen.losses[:5])  # it trains


def least_squares(mode, steps=400, lr=0.01, beta=0.9, grid=2.0 ** -6):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g)
    w_true = torch.randn(8, 1, generator=g)
    b = a @ w_true
    layer = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=beta)
    eco = sdk.create("callback", "eco_error_compensated_quantized", grid_step=grid)
    for _ in range(steps):
        opt.zero_grad()
        ((layer(a) - b).square().mean() / 2).backward()
        opt.step()
        if mode == "eco":
            eco.after_optimizer_step(State(model=layer, optimizer=opt))
        elif mode == "naive":  # round without compensation: small updates vanish
            with torch.no_grad():
                layer.weight.copy_(torch.round(layer.weight / grid) * grid)
    with torch.no_grad():
        return float((layer(a) - b).square().mean() / 2), layer.weight.detach().clone()


def test_naive_quantised_sgd_stalls_where_eco_does_not():
    master, _ = least_squares("master")
    naive, _ = least_squares("naive")
    eco, w = least_squares("eco")
    assert torch.equal(torch.round(w / 2.0 ** -6) * 2.0 ** -6, w)  # on the grid
    best_on_grid = 8 * (2.0 ** -7) ** 2  # the grid's own resolution bounds the reachable loss
    assert naive > 5 * max(master, best_on_grid)
    assert eco < 0.25 * naive


def test_bad_optimizers_and_parameters_are_refused():
    eco = sdk.create("callback", "eco_error_compensated_quantized")
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(sdk.ConfigError, match="momentum of SGD, Adam or AdamW; got RMSprop"):
        eco.on_fit_start(State(optimizer=torch.optim.RMSprop(layer.parameters())))
    with pytest.raises(sdk.ConfigError, match="without AMSGrad"):
        eco.on_fit_start(State(optimizer=torch.optim.Adam(layer.parameters(), amsgrad=True)))
    with pytest.raises(sdk.ConfigError, match="needs SGD momentum in \\(0, 1\\) without Nesterov"):
        eco.on_fit_start(State(optimizer=torch.optim.SGD(layer.parameters(), lr=0.1)))
    with pytest.raises(sdk.ConfigError, match="rounding must be one of"):
        sdk.create("callback", "eco_error_compensated_quantized", rounding="up")
    with pytest.raises(sdk.ConfigError, match="bits must be in"):
        sdk.create("callback", "eco_error_compensated_quantized", bits=1)


def test_adam_variant_returns_the_error_through_the_first_moment():
    """Adam late in a run, no gradient after the injection: the displacement with the injected
    first moment minus the one without it is the error (within the second moment's drift)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2, bias=False)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    for _ in range(1000):  # late: the bias corrections are ~ 1
        opt.zero_grad()
        layer(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    eco = sdk.create("callback", "eco_error_compensated_quantized", grid_step=2.0 ** -4)
    stepped = layer.weight.detach().clone()
    state = opt.state[layer.weight]
    c = adam_injection_coefficient(1e-3, 0.9, 0.999, 1e-8, int(state["step"]), state["exp_avg_sq"])
    eco.after_optimizer_step(State(model=layer, optimizer=opt))
    error = stepped - layer.weight.detach()
    assert bool((error != 0).any()) and bool(eco.last_grids == {})  # the fixed grid
    assert torch.equal(torch.round(layer.weight / 2.0 ** -4) * 2.0 ** -4, layer.weight)

    def coast(first_moment):
        w = torch.nn.Parameter(layer.weight.detach().clone())
        o = torch.optim.Adam([w], lr=1e-3)
        o.state[w] = {"step": state["step"].clone(), "exp_avg": first_moment.clone(),
                      "exp_avg_sq": state["exp_avg_sq"].clone()}
        start = w.detach().clone()
        for _ in range(300):
            w.grad = torch.zeros_like(w)
            o.step()
        return w.detach() - start

    moved = coast(state["exp_avg"]) - coast(state["exp_avg"] + c * error)
    torch.testing.assert_close(moved, error, rtol=0.05, atol=1e-7)
