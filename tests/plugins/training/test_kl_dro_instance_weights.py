"""kl_dro_instance_weights: the weights equal softmax(l / r) written out with Python floats, are
detached (the gradient of the reduced loss is the weights themselves), tend to uniform as r
grows and to the worst sample as r shrinks, and resume as a stateless reweighter."""

import math

import pytest
import torch

import sdk
from sdk.types import Batch, Loss


def slow(losses, r):
    e = [math.exp(l / r) for l in losses]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("r", [0.3, 1.0, 4.0])
def test_weights_equal_the_closed_form_and_are_detached(r):
    per = (3 * torch.rand(12, generator=torch.Generator().manual_seed(1))).requires_grad_()
    rw = sdk.create("reweighter", "kl_dro_instance_weights", r=r)
    w = rw.weights(per, Batch())
    assert torch.allclose(w, torch.tensor(slow(per.tolist(), r)), rtol=1e-5)
    assert not w.requires_grad
    reduced = rw.reduce(Loss(value=per.mean(), per_sample=per), Batch())
    assert reduced.value.item() == pytest.approx(sum(a * b for a, b in zip(slow(per.tolist(), r), per.tolist())), rel=1e-5)
    grad = torch.autograd.grad(reduced.value, per)[0]
    assert torch.allclose(grad, w, rtol=1e-5)  # weights enter as constants: d(sum w l)/dl = w


def test_limits_of_the_regularisation():
    per = torch.tensor([0.1, 0.5, 2.0, 0.7])
    uniform = sdk.create("reweighter", "kl_dro_instance_weights", r=1e6).weights(per, Batch())
    assert torch.allclose(uniform, torch.full((4,), 0.25), atol=1e-6)
    worst = sdk.create("reweighter", "kl_dro_instance_weights", r=1e-3).weights(per, Batch())
    assert torch.allclose(worst, torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-6)
    default = sdk.create("reweighter", "kl_dro_instance_weights").weights(per, Batch())
    assert torch.allclose(default, torch.softmax(per, 0))  # r = 1


def test_bad_inputs_are_named():
    rw = sdk.create("reweighter", "kl_dro_instance_weights")
    with pytest.raises(sdk.ShapeError, match="'kl_dro_instance_weights': Batch.targets has 3 rows, but there are 2"):
        rw.weights(torch.ones(2), Batch(targets=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.ConfigError, match="r must be > 0"):
        sdk.create("reweighter", "kl_dro_instance_weights", r=0.0)
