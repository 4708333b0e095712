"""infinite_lr_schedule: equals its piecewise formula (written out here) at every phase
boundary and inside each phase, is continuous where the paper's phases meet, and a Trainer
killed in the middle of the cooldown or the constant phase resumes with the same rates."""

import functools
import math

import pytest
import torch

import sdk
from sdk.interfaces import Callback

W, C, A, CONST, MIN = 10, 20, 15, 0.4, 0.02


def formula(t, total):
    start = total - A
    if t < W:
        return t / W
    if t < W + C:
        return CONST + (1 - CONST) * (1 + math.cos(math.pi * (t - W) / C)) / 2
    if t < start:
        return CONST
    return CONST * math.exp(math.log(MIN / CONST) * min(1.0, (t - start) / A))


def schedule(**kw):
    return sdk.create("schedule", "infinite_lr_schedule", warmup_steps=W, cooldown_steps=C,
                      constant_lr=CONST, min_lr=MIN, anneal_steps=A, **kw)


def test_equals_the_formula_at_every_boundary_and_inside_each_phase():
    f, total = schedule(), 100
    boundaries = [0, W - 1, W, W + 1, W + C - 1, W + C, total - A - 1, total - A, total - A + 1,
                  total - 1, total, total + 7]
    for t in boundaries + list(range(0, total + 1, 3)):
        assert f(t, total) == pytest.approx(formula(t, total), rel=1e-12, abs=1e-15), t
    assert f(W, total) == 1.0 and f(W + C, total) == CONST and f(total, total) == pytest.approx(MIN)
    assert f(W + C // 2, total) == pytest.approx((1 + CONST) / 2)  # half-way down the cosine
    # continuous where the phases meet: one step changes the rate by at most a step's slope
    values = [f(t, total) for t in range(total + 1)]
    assert max(abs(b - a) for a, b in zip(values, values[1:])) <= 1 / W + 1e-12


def test_constant_phase_needs_no_length_and_anneals_at_a_given_step():
    f = sdk.create("schedule", "infinite_lr_schedule", warmup_steps=2, cooldown_steps=4, constant_lr=0.3)
    assert [f(t, None) for t in (6, 10**6)] == [0.3, 0.3]  # no budget: constant for ever
    g = schedule(anneal_start=50)
    assert g(49, None) == CONST and g(50 + A, None) == pytest.approx(MIN)
    assert g(50 + 5, None) == pytest.approx(CONST * (MIN / CONST) ** (5 / A))


@pytest.mark.parametrize(("kw", "message"), [
    ({"constant_lr": 0.0}, "constant_lr must be in"),
    ({"min_lr": 0.6, "constant_lr": 0.5}, r"min_lr \(0.6\) must not exceed constant_lr"),
    ({"warmup_steps": 5, "anneal_start": 3}, r"anneal_start \(3\) falls before"),
    ({"cooldown_steps": -1}, "cooldown_steps must be >= 0"),
])
def test_bad_parameters(kw, message):
    with pytest.raises(sdk.ConfigError, match=message):
        sdk.create("schedule", "infinite_lr_schedule", **kw)


def test_bad_progress_is_named():
    with pytest.raises(sdk.ConfigError, match="needs its length"):
        schedule()(W + C + 1, None)
    with pytest.raises(sdk.ConfigError, match="leaves no room"):
        schedule()(40, 40)
    with pytest.raises(sdk.ConfigError, match="step must be an integer >= 0"):
        schedule()(-1, 100)


class Rates(Callback):
    def __init__(self, kill_at=None):
        self.lrs, self.kill_at = [], kill_at

    def before_optimizer_step(self, state):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def after_optimizer_step(self, state):
        if state.step == self.kill_at:
            raise KeyboardInterrupt


def test_resumes_mid_phase_exactly(tmp_path):
    from sdk.data import IndexedDataset

    data = IndexedDataset(torch.randn(48, 6, generator=torch.Generator().manual_seed(0)), torch.arange(48) % 3)
    f = sdk.create("schedule", "infinite_lr_schedule", warmup_steps=2, cooldown_steps=6,
                   constant_lr=0.4, min_lr=0.05, anneal_steps=4)

    def run(run_dir, rates, resume=False):
        torch.manual_seed(0)
        trainer = sdk.Trainer(sdk.create("encoder", "mlp", in_dim=6, out_dim=3),
                              sdk.create("objective", "cross_entropy"),
                              functools.partial(torch.optim.SGD, lr=0.5), scheduler=f,
                              callbacks=[rates], max_steps=16, run_dir=run_dir, checkpoint_every=1,
                              progress=False, device="cpu")
        try:
            trainer.fit(torch.utils.data.DataLoader(data, batch_size=4), resume=resume)
        except KeyboardInterrupt:
            pass
        return trainer

    straight = Rates()
    run(tmp_path / "a", straight)
    assert straight.lrs == pytest.approx([0.5 * f(t, 16) for t in range(16)])
    for kill in (5, 10):  # inside the cooldown, inside the constant phase
        first, second = Rates(kill_at=kill), Rates()
        run(tmp_path / f"k{kill}", first)
        resumed = run(tmp_path / f"k{kill}", second, resume=True)
        assert resumed.step == 16
        start = 16 - len(second.lrs)  # the last checkpoint, before the kill
        assert start == kill - 1  # the step killed is replayed
        assert first.lrs == straight.lrs[:kill] and second.lrs == straight.lrs[start:]
