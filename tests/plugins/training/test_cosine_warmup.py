"""cosine_warmup: analytic values at the key steps, monotone in each phase, and the learning
rate a Trainer steps with is the base rate times the schedule."""

import functools
import math

import pytest
import torch

import sdk
from sdk.interfaces import Callback


def test_values_at_the_key_steps():
    f = sdk.create("schedule", "cosine_warmup", warmup_steps=10, min_lr=0.1)
    assert f(0, 110) == 0.0
    assert f(5, 110) == pytest.approx(0.5)
    assert f(10, 110) == 1.0
    assert f(60, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert f(35, 110) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert f(110, 110) == pytest.approx(0.1)
    assert f(500, 110) == pytest.approx(0.1)  # past the end: the floor
    g = sdk.create("schedule", "cosine_warmup", warmup_steps=4, start_factor=0.2)
    assert [g(t, 10) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_rises_during_warm_up_and_falls_after():
    f = sdk.create("schedule", "cosine_warmup", warmup_steps=30, min_lr=0.05)
    values = [f(t, 200) for t in range(201)]
    assert all(b > a for a, b in zip(values[:30], values[1:31]))
    assert all(b < a for a, b in zip(values[30:200], values[31:201]))
    assert max(values) == values[30] == 1.0 and min(values[30:]) == pytest.approx(0.05)


def test_without_warm_up_it_starts_at_one_and_needs_the_length_only_after():
    f = sdk.create("schedule", "cosine_warmup")
    assert f(0, None) == 1.0  # what an LR scheduler asks before the run's length is known
    with pytest.raises(sdk.ConfigError, match="cosine needs the run's length"):
        f(1, None)


@pytest.mark.parametrize(("param", "value", "message"), [
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("min_lr", 1.5, r"cosine_warmup: min_lr must be in \[0, 1\], got 1.5"),
    ("start_factor", -0.1, r"start_factor must be in \[0, 1\]"),
])
def test_bad_parameters(param, value, message):
    with pytest.raises(sdk.ConfigError, match=message):
        sdk.create("schedule", "cosine_warmup", **{param: value})


class LearningRates(Callback):
    def __init__(self):
        self.lrs = []

    def before_optimizer_step(self, state):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def test_the_trainer_steps_with_base_rate_times_schedule():
    from sdk.data import IndexedDataset

    data = IndexedDataset(torch.randn(48, 6), torch.arange(48) % 3)
    schedule = sdk.create("schedule", "cosine_warmup", warmup_steps=3, min_lr=0.2)
    seen = LearningRates()
    sdk.Trainer(sdk.create("encoder", "mlp", in_dim=6, out_dim=3), sdk.create("objective", "cross_entropy"),
                functools.partial(torch.optim.SGD, lr=0.5), scheduler=schedule, callbacks=[seen],
                max_steps=10, progress=False, device="cpu").fit(torch.utils.data.DataLoader(data, batch_size=4))
    assert seen.lrs == pytest.approx([0.5 * schedule(t, 10) for t in range(10)])
    assert seen.lrs[0] == 0.0 and seen.lrs[3] == 0.5 and seen.lrs[-1] > 0.5 * 0.2


@pytest.mark.parametrize(("step", "max_steps", "message"), [
    (-1, 10, "step must be an integer >= 0"),  # warmup_steps=0: was a ZeroDivisionError
    (0.5, 10, "step must be an integer >= 0"),
    (3, 0, "max_steps must be None or an integer >= 1"),
    (3, -10, "max_steps must be None or an integer >= 1"),
])
def test_bad_progress_is_named(step, max_steps, message):
    with pytest.raises(sdk.ConfigError, match=f"cosine_warmup: {message}"):
        sdk.create("schedule", "cosine_warmup")(step, max_steps)
