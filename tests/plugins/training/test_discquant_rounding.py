"""discquant_rounding: after rounding every weight is exactly on its grid and one of its two
neighbouring grid points, the gradient written into x is the authors' -c + clamp(rho dKL/dx), and
on a digits MLP at 3 bits the rounded model keeps its outputs (KL) and accuracy better than
round-to-nearest; the callback rounds a Trainer's encoder when the fit ends."""

import copy
import functools

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.training.discquant_rounding import discquant_round, kl_to_original
from sdk.quantization import Grid


def digits_mlp(seed=0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1200], order[1200:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    return model, x[train], x[test], y[test]


def rtn(model, bits=3, group_size=32):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() >= 2:
                p.copy_(Grid.fit(p, bits, symmetric=False, group_size=group_size).round(p))
    return out


def test_keeps_outputs_and_accuracy_better_than_round_to_nearest():
    model, x_train, x_test, y_test = digits_mlp()
    nearest = rtn(model)
    rounded = copy.deepcopy(model)
    grids = discquant_round(rounded, list(x_train.split(300)), steps=160, warmup=16)
    with torch.no_grad():
        full = model(x_test)
        acc = {name: float((m(x_test).argmax(1) == y_test).float().mean())
               for name, m in (("full", model), ("rtn", nearest), ("discquant", rounded))}
        kl = {name: float(kl_to_original(full, m(x_test))) for name, m in (("rtn", nearest), ("discquant", rounded))}
    for name, p in rounded.named_parameters():
        if p.dim() >= 2:
            assert bool(grids[name].contains(p.detach()).all())
            down, up = grids[name].neighbours(dict(model.named_parameters())[name].detach())
            assert bool(((p == down) | (p == up)).all())
        else:
            assert torch.equal(p, dict(model.named_parameters())[name])  # biases untouched
    assert kl["discquant"] < 0.7 * kl["rtn"]
    assert acc["discquant"] >= acc["rtn"]


def test_the_gradient_written_into_x_is_the_authors(monkeypatch):
    model = torch.nn.Linear(4, 3, bias=False)
    x_in = torch.randn(5, 4)
    seen = {}

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            seen.setdefault("grads", [p.grad.clone() for group in self.param_groups for p in group["params"]])
            seen.setdefault("x", [p.detach().clone() for group in self.param_groups for p in group["params"]])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    w = model.weight.detach().clone()
    discquant_round(model, [x_in], bits=3, group_size=None, steps=1, warmup=0, rho=5.0, clamp=0.3)
    grid = Grid.fit(w, 3, symmetric=False)
    down, up = grid.neighbours(w)
    gap = up - down
    y = torch.where(gap == 0, 0.5, (w - down) / torch.where(gap == 0, 1, gap))
    x = seen["x"][0].requires_grad_()
    delta2 = 12 * ((down + torch.round(y) * gap - w) ** 2).mean()
    loss = kl_to_original(x_in @ w.T, x_in @ (down + x * gap).T) / delta2
    g = torch.autograd.grad(loss, x)[0]
    assert torch.allclose(seen["grads"][0], -(2 * y - 1) + (5.0 * g).clamp(-0.3, 0.3), atol=1e-6)


def test_the_callback_rounds_the_encoder_when_the_fit_ends():
    from sdk.data import IndexedDataset

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    data = IndexedDataset(x, (x[:, 0] > 0).long())
    cb = sdk.create("callback", "discquant_rounding", steps=8, warmup=2, group_size=None)
    encoder = sdk.create("encoder", "mlp", in_dim=6, out_dim=2, hidden_dims=(8,))
    sdk.Trainer(encoder, sdk.create("objective", "cross_entropy"),
                functools.partial(torch.optim.SGD, lr=0.1), callbacks=[cb], max_steps=4,
                progress=False, device="cpu").fit(torch.utils.data.DataLoader(data, batch_size=16))
    weights = {n: p for n, p in encoder.named_parameters() if p.dim() >= 2}
    assert weights and set(cb.grids) == set(weights)
    for name, p in weights.items():
        assert bool(cb.grids[name].contains(p.detach()).all())


def test_bad_parameters_and_models():
    with pytest.raises(sdk.ConfigError, match="init must be one of"):
        sdk.create("callback", "discquant_rounding", init="zeros")
    with pytest.raises(sdk.ConfigError, match="bits must be in"):
        sdk.create("callback", "discquant_rounding", bits=1)
    with pytest.raises(sdk.RequirementError, match="no parameter with at least 2 dimensions"):
        discquant_round(torch.nn.BatchNorm1d(3), [torch.randn(4, 3)])
