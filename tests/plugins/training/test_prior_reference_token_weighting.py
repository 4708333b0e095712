"""prior_reference_token_weighting: the weights are (1 - p_ref(y))^alpha against a loop (alpha = 1 the
paper's default), normalised to mean 1 by the reduction (value and gradient, weights detached), a
target the reference is sure of weighs 0 and a uniform reference gives equal weights; on synthetic
data where half the labels need the 'image' block, a text-only reference ranks those samples higher
and the weighted model learns them better than plain cross-entropy at equal steps."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk import keys
from sdk.types import Batch, Loss

NAME = "prior_reference_token_weighting"


def batch(logits, targets):
    return Batch(targets=targets, extras={keys.REFERENCE_LOGITS: logits})


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_weights_and_reduction_equal_a_loop(alpha):
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 5, generator=g), torch.randint(0, 5, (7,), generator=g)
    per = (torch.rand(7, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    rw = sdk.create("reweighter", NAME, alpha=alpha)
    w = rw.weights(per, batch(logits, targets))
    want = []
    for i in range(7):
        z = logits[i].tolist()
        p = math.exp(z[targets[i]]) / sum(math.exp(v) for v in z)
        want.append((1 - p) ** alpha)
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float64), rtol=1e-6)
    value = rw.reduce(Loss(value=per.mean(), per_sample=per), batch(logits, targets)).value
    normalised = [7 * x / sum(want) for x in want]  # PRIOR's weights, mean 1
    assert value.item() == pytest.approx(sum(n * l for n, l in zip(normalised, per.tolist())) / 7, rel=1e-6)
    assert torch.allclose(torch.autograd.grad(value, per)[0], torch.tensor(normalised, dtype=torch.float64) / 7,
                          rtol=1e-6)
    assert sdk.create("reweighter", NAME).alpha == 1.0


def test_analytic_cases():
    rw = sdk.create("reweighter", NAME)
    sure = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    w = rw.weights(torch.ones(2), batch(sure, torch.tensor([0, 2])))
    assert w[0].item() == pytest.approx(0.0, abs=1e-12) and w[1].item() == pytest.approx(2 / 3)
    uniform = rw.weights(torch.ones(4), batch(torch.zeros(4, 3), torch.tensor([0, 1, 2, 1])))
    assert torch.allclose(uniform, torch.full((4,), 2 / 3))


def data(n, seed, C=4):
    """x = [text (6), image (6)]; half the labels are a linear read-out of the text block, half of
    the image block (fixed read-outs)."""
    g = torch.Generator().manual_seed(seed)
    text, image = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    w_text = torch.randn(6, C, generator=torch.Generator().manual_seed(100))
    w_image = torch.randn(6, C, generator=torch.Generator().manual_seed(101))
    needs_image = torch.rand(n, generator=g) < 0.5
    y = torch.where(needs_image, (image @ w_image).argmax(1), (text @ w_text).argmax(1))
    return torch.cat([text, image], 1), y, needs_image


def fit(x, y, reweighter=None, reference=None, steps=200, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(x), (64,), generator=g)
        per = F.cross_entropy(model(x[i]), y[i], reduction="none")
        loss = per.mean() if reweighter is None else reweighter.reduce(
            Loss(value=per.mean(), per_sample=per), batch(reference[i], y[i])).value
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def text_only(x):
    return torch.cat([x[:, :6], torch.zeros_like(x[:, 6:])], 1)


def test_text_only_reference_prioritises_the_image_dependent_samples():
    for seed in range(3):
        x, y, needs_image = data(2000, seed)
        x_test, y_test, test_needs_image = data(2000, seed + 50)
        reference = fit(text_only(x), y, steps=300, seed=seed)
        with torch.no_grad():
            ref_logits = reference(text_only(x))
        rw = sdk.create("reweighter", NAME)
        w = rw.weights(torch.ones(2000), batch(ref_logits, y))
        auroc = (w[needs_image][:, None] > w[~needs_image][None]).float().mean().item()
        accuracy = {}
        for name, r in (("uniform", None), ("prior", rw)):
            model = fit(x, y, r, ref_logits, steps=150, seed=seed)
            with torch.no_grad():
                pred = model(x_test).argmax(1)
            accuracy[name] = (pred[test_needs_image] == y_test[test_needs_image]).float().mean().item()
        # measured: AUROC 0.80-0.84; image-dependent accuracy 0.51-0.52 -> 0.59-0.64
        assert auroc > 0.75, (seed, auroc)
        assert accuracy["prior"] > accuracy["uniform"] + 0.05, (seed, accuracy)


def test_bad_input():
    with pytest.raises(sdk.ConfigError, match="alpha must be > 0"):
        sdk.create("reweighter", NAME, alpha=0.0)
    rw = sdk.create("reweighter", NAME)
    with pytest.raises(sdk.RequirementError, match=f"{NAME}.*reference_logits"):
        rw.weights(torch.ones(3), Batch(targets=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}.*class scores \[3, C\]"):
        rw.weights(torch.ones(3), batch(torch.zeros(3), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.RequirementError, match=f"{NAME}.*Batch.targets"):
        rw.weights(torch.ones(3), Batch(extras={keys.REFERENCE_LOGITS: torch.zeros(3, 2)}))
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}.*Batch.targets must lie in \[0, 2\)"):
        rw.weights(torch.ones(3), batch(torch.zeros(3, 2), torch.tensor([0, 1, 2])))
    with pytest.raises(sdk.ShapeError, match=f"{NAME}.*Batch.targets must be integer ids"):
        rw.weights(torch.ones(3), batch(torch.zeros(3, 2), torch.zeros(3, 2)))
