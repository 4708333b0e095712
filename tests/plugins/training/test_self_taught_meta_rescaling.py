"""self_taught_meta_rescaling: the features and weights equal the formulas written out, the
meta-gradient (second order, through the virtual step) equals central finite differences, one
meta step is the Adam step of that gradient, the weights are detached, and the rescaler, its Adam
state and the running losses resume exactly in a killed run."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.training.self_taught_meta_rescaling import meta_loss, rescaler_features
from sdk.types import Batch, Loss


def setup(seed=0, b=8):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(b, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)
    return model, x, y


def test_features_and_weights_by_hand():
    model, x, y = setup()
    model.float()
    x = x.float()
    rw = sdk.create("reweighter", "self_taught_meta_rescaling", num_samples=8)
    with torch.no_grad():
        logits = model(x)
    per = F.cross_entropy(logits, y, reduction="none")
    rw.attach(model, 0.1, x, logits)
    rw.eval()  # no meta step: the weights of the initial rescaler
    w = rw.weights(per.clone().requires_grad_(), Batch(targets=y, index=torch.arange(8)))
    assert not w.requires_grad
    rows = []
    for i in range(8):
        p = torch.softmax(logits[i], 0).tolist()
        entropy = -sum(q * math.log(q) for q in p)
        other = max(q for k, q in enumerate(p) if k != int(y[i]))
        rows.append([float(per[i]), float(per[i]), entropy, p[int(y[i])] - other])  # EMA = loss at first sight
    u = torch.tensor(rows)
    assert torch.allclose(rescaler_features(per, per, logits, y), u, atol=1e-6)
    h = torch.relu(u @ rw.w1.T + rw.b1)
    g = torch.sigmoid(h @ rw.w2.T + rw.b2).squeeze(1)
    assert torch.allclose(w, g / g.mean(), rtol=1e-5)


def test_meta_gradient_equals_finite_differences():
    model, x, y = setup()
    rw = sdk.create("reweighter", "self_taught_meta_rescaling", hidden=4)
    phi = [t.double().clone().requires_grad_() for t in rw.phi()]
    params = dict(model.named_parameters())
    with torch.no_grad():
        logits = model(x)
    u = rescaler_features(F.cross_entropy(logits, y, reduction="none"), torch.zeros(8), logits, y).double()

    def value(ph):
        return meta_loss(ph, u, params, model, x, y, lr=0.5, meta_fraction=0.5)

    grads = torch.autograd.grad(value(phi), phi)
    eps = 1e-6
    for k, (p, gr) in enumerate(zip(phi, grads)):
        for j in range(min(p.numel(), 4)):
            plus = [q.detach().clone() for q in phi]
            minus = [q.detach().clone() for q in phi]
            plus[k].view(-1)[j] += eps
            minus[k].view(-1)[j] -= eps
            fd = (value(plus) - value(minus)).detach() / (2 * eps)
            assert float(gr.view(-1)[j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)
    assert any(float(g.abs().max()) > 1e-6 for g in grads)  # the second-order path is not empty


def test_one_meta_step_is_an_adam_step():
    model, x, y = setup()
    model.float()
    x = x.float()
    rw = sdk.create("reweighter", "self_taught_meta_rescaling", num_samples=8, meta_lr=0.01)
    with torch.no_grad():
        logits = model(x)
    per = F.cross_entropy(logits, y, reduction="none")
    before = [t.clone() for t in rw.phi()]
    u = rescaler_features(per, per, logits, y)
    phi = [t.clone().requires_grad_() for t in before]
    grads = torch.autograd.grad(meta_loss(phi, u, dict(model.named_parameters()), model, x, y, 0.1, 0.25), phi)
    rw.attach(model, 0.1, x, logits)
    rw.reduce(Loss(value=per.mean(), per_sample=per), Batch(targets=y, index=torch.arange(8)))
    for old, new, g in zip(before, rw.phi(), grads):
        # Adam's first step: m_hat = g, v_hat = g^2, so the step is lr g / (|g| + eps)
        assert torch.allclose(new, old - 0.01 * g / (g.abs() + 1e-8), atol=1e-6)
    assert int(rw.meta_steps) == 1 and int(rw.stats.seen.sum()) == 8


def test_state_resumes_exactly(tmp_path):
    runs = sdk.testing.check_resume(
        objective=lambda: sdk.create("objective", "cross_entropy"),
        reweighter=lambda: sdk.create("reweighter", "self_taught_meta_rescaling", num_samples=40),
        transforms=lambda: [None], tmp_dir=tmp_path)
    rw = runs.resumed.reweighter
    assert int(rw.meta_steps) == 6 and int(rw.stats.seen.sum()) == 6 * 8


def test_bad_inputs_are_named():
    rw = sdk.create("reweighter", "self_taught_meta_rescaling")
    with pytest.raises(sdk.RequirementError, match="needs the encoder's class logits"):
        rw.weights(torch.ones(3), Batch(targets=torch.zeros(3, dtype=torch.long), index=torch.arange(3)))
    with pytest.raises(sdk.RequirementError, match="needs Batch.index"):
        rw.weights(torch.ones(3), Batch(targets=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.ConfigError, match=r"meta_fraction must be in \(0, 1\]"):
        sdk.create("reweighter", "self_taught_meta_rescaling", meta_fraction=0.0)
