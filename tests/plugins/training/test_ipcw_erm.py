"""ipcw_erm: the Kaplan-Meier censoring survival equals a slow product-limit loop (ties
included), weights are delta / (B S_C(T-)), all 1 / B without censoring, and on synthetic
right-censored regression with a known answer the weighted least squares recovers the true
coefficients where naive ERM on the observed times is biased."""

import pytest
import torch

import sdk
from plugins.training.ipcw_erm import censoring_survival
from sdk import keys
from sdk.types import Batch, Loss


def slow_survival_before(times, events, t):
    """prod over distinct times s < t of (1 - #censored at s / #at risk at s)."""
    s = 1.0
    for u in sorted(set(times)):
        if u >= t:
            break
        at_risk = sum(1 for x in times if x >= u)
        censored = sum(1 for x, e in zip(times, events) if x == u and e == 0)
        s *= 1 - censored / at_risk
    return s


def batch(times, events):
    return Batch(extras={keys.TIME: torch.tensor(times), keys.EVENT: torch.tensor(events)})


def test_weights_equal_the_product_limit_loop():
    times = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0, 2.0, 6.0, 1.0, 4.0]
    events = [1, 0, 1, 0, 0, 1, 1, 1, 0, 0]
    rw = sdk.create("reweighter", "ipcw_erm").fit(torch.tensor(times), torch.tensor(events))
    grid, surv = censoring_survival(torch.tensor(times), torch.tensor(events))
    for u, s in zip(grid.tolist(), surv.tolist()):
        assert s == pytest.approx(slow_survival_before(times, events, u + 1e-9))
    per = torch.rand(10).requires_grad_()
    w = rw.weights(per, batch(times, events))
    want = [e / (10 * slow_survival_before(times, events, t)) for t, e in zip(times, events)]
    assert torch.allclose(w, torch.tensor(want), rtol=1e-6)
    reduced = rw.reduce(Loss(value=per.mean(), per_sample=per), batch(times, events))
    assert torch.allclose(torch.autograd.grad(reduced.value, per)[0], w)  # sum w l, w constant


def test_without_censoring_every_weight_is_one_over_b():
    t = torch.rand(7) + 0.5
    rw = sdk.create("reweighter", "ipcw_erm").fit(t, torch.ones(7))
    assert torch.allclose(rw.weights(torch.ones(7), batch(t.tolist(), [1] * 7)), torch.full((7,), 1 / 7))


def censored_regression(n, seed):
    """Y = 1 + 2 x + noise (x in [0, 2]), C ~ U[0, 6] independent: T = min(Y, C)."""
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.rand(n, generator=g)
    y = 1 + 2 * x + 0.6 * torch.randn(n, generator=g)
    c = 6 * torch.rand(n, generator=g)
    return x, torch.minimum(y, c), (y <= c).long()


def weighted_fit(x, t, w):
    a = torch.stack([torch.ones_like(x), x], 1).double()
    aw = a * w.double()[:, None]
    return torch.linalg.solve(a.T @ aw, aw.T @ t.double())


def test_removes_the_bias_of_naive_erm_on_censored_data():
    x, t, events = censored_regression(4000, 0)
    rw = sdk.create("reweighter", "ipcw_erm").fit(t, events)
    w = rw.weights(torch.ones(4000), Batch(extras={keys.TIME: t, keys.EVENT: events}))
    truth = torch.tensor([1.0, 2.0], dtype=torch.float64)
    naive = weighted_fit(x, t, torch.ones(4000))  # the observed times as labels
    dropped = weighted_fit(x, t, events.double())  # censored rows dropped, unweighted
    ipcw = weighted_fit(x, t, w)
    assert (ipcw - truth).abs().max() < 0.05  # 0.033 (seeded)
    # the observed times as labels shrink the slope by half; dropping the censored rows selects
    # the low outcomes (0.088 off): only the 1 / S_C weights undo both
    assert (naive - truth).abs().max() > 0.5 and (dropped - truth).abs().max() > 0.07


def test_bad_inputs_are_named():
    rw = sdk.create("reweighter", "ipcw_erm")
    with pytest.raises(sdk.NotFittedError, match="'ipcw_erm': weights\\(\\) before fit"):
        rw.weights(torch.ones(2), batch([1.0, 2.0], [1, 0]))
    with pytest.raises(sdk.RequirementError, match=r"needs Batch.extras\['time'\] and \['event'\]"):
        rw.weights(torch.ones(2), Batch())
    with pytest.raises(sdk.ShapeError, match=r"needs floating times \[N\] and events \[N\]"):
        rw.fit(torch.ones(3), torch.ones(2))
    rw.fit(torch.ones(3), torch.ones(3))
    with pytest.raises(sdk.ShapeError, match=r"extras\['time'\] \[3\] does not match the per-sample losses \[2\]"):
        rw.weights(torch.ones(2), batch([1.0, 2.0, 3.0], [1, 0, 1]))
