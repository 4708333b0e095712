"""loss_based_sample_reweighting: the weights equal a slow transcription of the authors' code
(normalize_losses, apply_strategy, scale_losses with the max subtracted) for every strategy,
LinUpper weighs the upper half equally and the lower half by exp(h / r), the burn-in is uniform,
the weights are detached, and the batch count resumes exactly."""

import math

import pytest
import torch

import sdk
from sdk.types import Batch, Loss


def slow(losses, strategy, r, delta=1.0):
    lo, hi = min(losses), max(losses)
    spread = max(hi - lo, 1e-6)
    h = [2 * delta * l / spread - delta * (hi + lo) / spread for l in losses]
    f = {"linupper": lambda x: min(x + delta, delta), "quadratic": lambda x: 1 - x * x / delta ** 2,
         "extremes": abs, "upper": lambda x: 0.5 * x + 0.5 * delta, "uniform": lambda x: x}[strategy]
    fs = [f(x) for x in h]
    g = [math.exp((x - max(fs)) / r) for x in fs]
    return [x / sum(g) for x in g], h


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "upper", "uniform"])
@pytest.mark.parametrize("r", [0.5, 1.0])
def test_weights_equal_the_authors_code(strategy, r):
    per = (2 + 3 * torch.rand(10, generator=torch.Generator().manual_seed(2))).requires_grad_()
    rw = sdk.create("reweighter", "loss_based_sample_reweighting", strategy=strategy, r=r, burnin=0)
    reduced = rw.reduce(Loss(value=per.mean(), per_sample=per), Batch())
    want, _ = slow(per.tolist(), strategy, r)
    grad = torch.autograd.grad(reduced.value, per)[0]  # detached weights: the gradient is w
    assert torch.allclose(grad, torch.tensor(want), rtol=1e-5)
    assert reduced.value.item() == pytest.approx(sum(w * l for w, l in zip(want, per.tolist())), rel=1e-5)


def test_linupper_shape():
    per = torch.linspace(1.0, 3.0, 9)
    rw = sdk.create("reweighter", "loss_based_sample_reweighting", r=0.7, burnin=0)
    w = rw.weights(per, Batch())
    _, h = slow(per.tolist(), "linupper", 0.7)
    upper = per >= 2.0  # at or above the mid loss: f = delta, one weight
    assert torch.allclose(w[upper], w[upper][0].expand(int(upper.sum())))
    ratio = w[~upper] / w.max()
    assert torch.allclose(ratio, torch.exp(torch.tensor(h)[~upper] / 0.7), rtol=1e-5)
    assert w.argmin() == 0


def test_burn_in_is_uniform_and_evaluation_does_not_count():
    per = torch.tensor([1.0, 4.0, 2.0, 3.0])
    rw = sdk.create("reweighter", "loss_based_sample_reweighting", burnin=3)
    for _ in range(3):
        assert torch.equal(rw.weights(per, Batch()), torch.full((4,), 0.25))
    rw.eval()
    rw.weights(per, Batch())
    assert int(rw.batches) == 3
    rw.train()
    assert torch.allclose(rw.weights(per, Batch()), torch.tensor(slow(per.tolist(), "linupper", 1.0)[0]))


def test_the_batch_count_resumes_exactly(tmp_path):
    runs = sdk.testing.check_resume(
        objective=lambda: sdk.create("objective", "cross_entropy"),
        reweighter=lambda: sdk.create("reweighter", "loss_based_sample_reweighting", burnin=2),
        transforms=lambda: [None], tmp_dir=tmp_path)
    assert int(runs.resumed.reweighter.batches) == 6


def test_bad_parameters_and_inputs():
    with pytest.raises(sdk.ConfigError, match="strategy must be one of"):
        sdk.create("reweighter", "loss_based_sample_reweighting", strategy="mid")
    with pytest.raises(sdk.ConfigError, match="burnin must be >= 0"):
        sdk.create("reweighter", "loss_based_sample_reweighting", burnin=-1)
    rw = sdk.create("reweighter", "loss_based_sample_reweighting")
    with pytest.raises(sdk.ShapeError, match=r"per-sample losses must be \[B\]"):
        rw.weights(torch.ones(2, 2), Batch())
