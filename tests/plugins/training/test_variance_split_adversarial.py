"""variance_split_adversarial: the split equals a loop over the teacher's class-probability
variances (the top half is easy), the loss equals the pseudo-label cross-entropy of the
confident easy samples plus the discriminator's BCE written out sample by sample, the gradient
reversal hands the features -lambda times the discriminator loss's gradient while the
discriminator descends it, and the catalogue's defaults (rho, tau, lambda) are the constructor's."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.training.variance_split_adversarial import variance_split
from sdk import keys
from sdk.types import Batch, Views


def slow_split(teacher, rho):
    b = len(teacher)
    scores = []
    for i in range(b):
        p = [math.exp(v) for v in teacher[i].tolist()]
        p = [v / sum(p) for v in p]
        m = sum(p) / len(p)
        scores.append(sum((v - m) ** 2 for v in p) / len(p))
    ranked = sorted(range(b), key=lambda i: (-scores[i], i))
    easy = set(ranked[:math.ceil(rho * b)])
    return scores, [i in easy for i in range(b)]


def inputs(seed, b=10, c=4, d=6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64).requires_grad_()
    t = 3 * torch.randn(b, c, generator=g, dtype=torch.float64)
    h = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    return z, t, h


@pytest.mark.parametrize("rho", [0.5, 0.3, 0.75])
def test_split_equals_the_loop(rho):
    _, t, _ = inputs(0, b=11)
    score, easy = variance_split(t, rho)
    want_score, want_easy = slow_split(t, rho)
    assert torch.allclose(score.double(), torch.tensor(want_score, dtype=torch.float64), rtol=1e-5)
    assert easy.tolist() == want_easy
    flat = variance_split(torch.zeros(4, 3), 0.5)[1]  # all tied: the lower indices
    assert flat.tolist() == [True, True, False, False]


def test_loss_equals_the_sample_loop():
    z, t, h = inputs(1)
    obj = sdk.create("objective", "variance_split_adversarial", feature_dim=6, hidden_dim=5, threshold=0.96).double()
    loss = obj(Views(embeddings=(z,), logits=z, extras={keys.TEACHER: (t,), keys.FEATURES: (h,)}), Batch())
    _, easy = slow_split(t, 0.5)
    total = 0.0
    for i in range(len(z)):
        p = torch.softmax(t[i], 0)
        if easy[i] and p.max() > 0.96:
            total += float(torch.logsumexp(z[i].detach(), 0) - z[i, int(p.argmax())].detach())
        with torch.no_grad():
            d = float(obj.discriminator(h[i:i + 1])[0, 0])
        y = 1.0 if easy[i] else 0.0
        total += -(y * math.log(1 / (1 + math.exp(-d))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-d))))
    assert loss.value.item() == pytest.approx(total / len(z), rel=1e-6)
    assert loss.logs["pseudo_labelled"].item() == pytest.approx(0.3)  # 3 of the 5 easy rows pass tau
    low = sdk.create("objective", "variance_split_adversarial", feature_dim=6, threshold=0.94).double()
    views = Views(embeddings=(z,), logits=z, extras={keys.TEACHER: (t,), keys.FEATURES: (h,)})
    assert low(views, Batch()).logs["pseudo_labelled"].item() == pytest.approx(0.5)  # row 2 (p 0.946) is hard


def test_gradient_reversal_between_features_and_discriminator():
    z, t, h = inputs(2)
    obj = sdk.create("objective", "variance_split_adversarial", feature_dim=6, grl_lambda=0.1).double()
    views = Views(embeddings=(z,), logits=z, extras={keys.TEACHER: (t,), keys.FEATURES: (h,)})
    loss = obj(views, Batch())
    params = list(obj.discriminator.parameters())
    g_h, *g_d = torch.autograd.grad(loss.value, [h, *params])
    _, easy = variance_split(t, 0.5)
    bce = F.binary_cross_entropy_with_logits(obj.discriminator(h)[:, 0], easy.double())
    want_h, *want_d = torch.autograd.grad(bce, [h, *params])
    assert torch.allclose(g_h, -0.1 * want_h)
    for a, b in zip(g_d, want_d):
        assert torch.allclose(a, b)


def test_defaults():
    obj = sdk.create("objective", "variance_split_adversarial")
    assert (obj.rho, obj.threshold, obj.grl_lambda) == (0.5, 0.8, 0.1)


def test_bad_inputs_are_named():
    z, t, h = inputs(3)
    obj = sdk.create("objective", "variance_split_adversarial", feature_dim=6).double()
    with pytest.raises(sdk.RequirementError, match="'variance_split_adversarial' needs extras\\['teacher'\\]"):
        obj(Views(embeddings=(z,), logits=z), Batch())
    with pytest.raises(sdk.ShapeError, match=r"'variance_split_adversarial': the features must be floating \[10, 6\].*\[10, 5\]"):
        obj(Views(embeddings=(z,), logits=z, extras={keys.TEACHER: (t,), keys.FEATURES: (h[:, :5],)}), Batch())
    with pytest.raises(sdk.ShapeError, match="teacher logits"):
        obj(Views(embeddings=(z,), logits=z, extras={keys.TEACHER: (t[:, :2],), keys.FEATURES: (h,)}), Batch())
    with pytest.raises(sdk.ConfigError, match="rho must be"):
        sdk.create("objective", "variance_split_adversarial", rho=1.0)
