"""eco_error_compensated_quantized: one step equals the paper's update written out (weights
rounded, the error injected into the momentum with c = (1 - beta) / (lr beta)), the injected
error's future contribution to the weights is exactly the error, the weights are exactly on the
grid after every Trainer step, and on least squares with a coarse grid naive quantised SGD
stalls while ECO comes close to the run with full-precision master weights."""

import functools

import pytest
import torch

import sdk
from plugins.training.eco_error_compensated_quantized import injection_coefficient
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
    with pytest.raises(sdk.ConfigError, match="injects the error into SGD's momentum buffer; got Adam"):
        eco.on_fit_start(State(optimizer=torch.optim.Adam(layer.parameters())))
    with pytest.raises(sdk.ConfigError, match="needs SGD momentum in \\(0, 1\\) without Nesterov"):
        eco.on_fit_start(State(optimizer=torch.optim.SGD(layer.parameters(), lr=0.1)))
    with pytest.raises(sdk.ConfigError, match="rounding must be one of"):
        sdk.create("callback", "eco_error_compensated_quantized", rounding="up")
    with pytest.raises(sdk.ConfigError, match="bits must be in"):
        sdk.create("callback", "eco_error_compensated_quantized", bits=1)
