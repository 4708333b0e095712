"""glow_gain_weighting: the reduced loss equals a slow transcription of the authors' compute_loss
(loss history by sample id, the batch mean for unseen samples, clamp(alpha (1 - sigmoid(beta
Delta)), 0.5, 5), unit weights in epoch 0, the mean of w l), value and gradient (weights
detached); w is non-increasing in the gain with w(0) = clamp(alpha / 2); evaluation leaves the
history alone; the Trainer's epoch reaches it and a killed run resumes exactly."""

import math

import pytest
import torch

import sdk
from plugins.training.glow_gain_weighting import gain_weights
from sdk.events import State
from sdk.types import Batch, Loss

NAME = "glow_gain_weighting"


class SlowGLOW:
    """The authors' compute_loss, one sample at a time."""

    def __init__(self, alpha, beta, low=0.5, high=5.0):
        self.alpha, self.beta, self.low, self.high, self.history = alpha, beta, low, high, {}

    def loss(self, ids, losses, epoch):
        mean = sum(losses) / len(losses)
        weights = []
        for sid, l in zip(ids, losses):
            if epoch < 1:
                weights.append(1.0)
                continue
            delta = self.history.get(sid, mean) - l
            w = self.alpha * (1 - 1 / (1 + math.exp(-self.beta * delta)))
            weights.append(min(max(w, self.low), self.high))
        for sid, l in zip(ids, losses):
            self.history[sid] = l
        return sum(w * l for w, l in zip(weights, losses)) / len(losses), weights


@pytest.mark.parametrize("alpha,beta", [(3.0, 10.0), (12.0, 2.0)])
def test_reduced_loss_equals_the_authors_loop(alpha, beta):
    rw = sdk.create("reweighter", NAME, alpha=alpha, beta=beta, num_samples=20)
    slow = SlowGLOW(alpha, beta)
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        rw.set_epoch(epoch)
        for _ in range(3):
            ids = torch.randperm(20, generator=g)[:6]
            per = (2 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_()
            value = rw.reduce(Loss(value=per.mean(), per_sample=per), Batch(index=ids)).value
            want, weights = slow.loss(ids.tolist(), per.tolist(), epoch)
            assert value.item() == pytest.approx(want, rel=1e-6)  # the history is float32
            grad = torch.autograd.grad(value, per)[0]
            assert torch.allclose(grad, torch.tensor(weights, dtype=torch.float64) / 6, rtol=1e-6)


def test_weight_shape_and_defaults():
    rw = sdk.create("reweighter", NAME)
    assert (rw.alpha, rw.beta, rw.min_weight, rw.max_weight) == (3.0, 10.0, 0.5, 5.0)
    gains = torch.linspace(-2, 2, 101)
    w = gain_weights(gains)
    assert (w[1:] <= w[:-1]).all()
    assert w[50].item() == pytest.approx(1.5)  # alpha / 2
    assert w.min().item() == 0.5 and w.max().item() == pytest.approx(3 / (1 + math.exp(-20)))
    assert gain_weights(torch.zeros(1), alpha=20.0).item() == 5.0  # clamp(alpha / 2) at the top
    assert gain_weights(torch.zeros(1), alpha=0.4).item() == 0.5  # and at the bottom


def test_first_epoch_is_unweighted_and_evaluation_keeps_the_history():
    rw = sdk.create("reweighter", NAME, num_samples=4)
    ids = torch.tensor([0, 1, 2])
    assert torch.equal(rw.weights(torch.tensor([1.0, 2.0, 3.0]), Batch(index=ids)), torch.full((3,), 1 / 3))
    assert rw.stats.loss[:3].tolist() == [1.0, 2.0, 3.0]
    rw.eval()
    rw.set_epoch(1)
    w = rw.weights(torch.tensor([1.0, 1.0, 1.0]), Batch(index=ids))
    assert torch.allclose(w * 3, gain_weights(torch.tensor([0.0, 1.0, 2.0])))
    assert rw.stats.loss[:3].tolist() == [1.0, 2.0, 3.0]  # evaluation did not record


def test_the_trainer_epoch_reaches_it_and_it_resumes_exactly(tmp_path):
    rw = sdk.create("reweighter", NAME)
    state = State(epoch=2)
    rw.on_epoch_start(state)
    assert int(rw.epoch) == 2
    runs = sdk.testing.check_resume(
        objective=lambda: sdk.create("objective", "cross_entropy"),
        reweighter=lambda: sdk.create("reweighter", NAME, num_samples=40),
        transforms=lambda: [None], tmp_dir=tmp_path, steps=12, kill_at=7, checkpoint_every=5)
    resumed = runs.resumed.reweighter
    assert int(resumed.epoch) == 2 and (resumed.stats.seen > 0).all()


def test_bad_input():
    with pytest.raises(sdk.ConfigError, match="alpha must be > 0"):
        sdk.create("reweighter", NAME, alpha=0.0)
    with pytest.raises(sdk.ConfigError, match="min_weight=6.0 exceeds max_weight=5.0"):
        sdk.create("reweighter", NAME, min_weight=6.0)
    rw = sdk.create("reweighter", NAME)
    with pytest.raises(sdk.RequirementError, match=f"{NAME}' needs Batch.index"):
        rw.weights(torch.ones(3), Batch())
    with pytest.raises(sdk.ShapeError, match=r"per-sample losses must be \[B\]"):
        rw.weights(torch.ones(3, 2), Batch())
    with pytest.raises(sdk.ShapeError, match=f"{NAME}': Batch.index has 2 rows"):
        rw.weights(torch.ones(3), Batch(index=torch.zeros(2, dtype=torch.long)))
