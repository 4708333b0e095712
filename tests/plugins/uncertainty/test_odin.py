"""odin against the closed-form input gradient of a linear model (float64): for
``z = A x + c`` the gradient of ``log S_yhat(x; T)`` is ``A^T (e_yhat - softmax(z / T)) / T``."""

import math

import pytest
import torch
from torch import nn

import sdk


def slow_odin(a, c, x, t, eps):
    out = []
    for row in x.double():
        z = a @ row + c
        p = torch.tensor([math.exp(v / t) for v in z.tolist()], dtype=torch.float64)
        p = p / p.sum()
        onehot = torch.zeros_like(p)
        onehot[int(p.argmax())] = 1
        grad = a.T @ (onehot - p) / t
        tilde = row - eps * torch.sign(-grad)
        z2 = (a @ tilde + c).tolist()
        e = [math.exp(v / t) for v in z2]
        out.append(-max(e) / sum(e))
    return torch.tensor(out, dtype=torch.float64)


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(6, 4).double()


@pytest.mark.parametrize(("t", "eps"), [(1000.0, 0.0014), (2.0, 0.05)])
def test_odin_equals_the_closed_form_perturbation_through_a_linear_model(t, eps):
    model = linear_model()
    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    det = sdk.create("detector", "odin", model=model, temperature=t, epsilon=eps)
    expected = slow_odin(model.weight.detach(), model.bias.detach(), x, t, eps)
    assert torch.allclose(det.score(x).double(), expected, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the model is not trained


def test_the_perturbation_raises_the_softmax_score_and_defaults_are_the_paper_s():
    model = linear_model(1)
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    plain = sdk.create("detector", "odin", model=model, epsilon=0.0).score(x)
    perturbed = sdk.create("detector", "odin", model=model, epsilon=0.01).score(x)
    assert (perturbed < plain).all()  # a step up the max softmax: less anomalous
    det = sdk.create("detector", "odin")
    assert (det.temperature, det.epsilon, det.inputs) == (1000.0, 0.0014, "logits")


def test_without_a_model_the_logits_themselves_are_perturbed():
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eye = torch.eye(3, dtype=torch.float64)
    expected = slow_odin(eye, torch.zeros(3, dtype=torch.float64), z, 1000.0, 0.0014)
    assert torch.allclose(sdk.create("detector", "odin").score(z).double(), expected, rtol=1e-6)
