"""sdk.adversarial: FGSM equals x + eps sign(w_y - w_other) on a linear model, PGD stays in the
eps-ball and the valid range and raises the loss above FGSM's, the attack leaves the model's
parameters, gradients, BatchNorm statistics and modes untouched (also under bf16 autocast), and
as a Transform it trains a Trainer's model on its own adversarial examples."""

import functools

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk.adversarial import AdversarialExamples, fgsm, pgd
from sdk.types import Batch


def test_fgsm_on_a_linear_model_by_hand():
    model = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
    x = torch.tensor([[0.5, 0.5, 0.5]])
    # d CE / dx for target 0 is (p - onehot) W: its sign is the sign of W_1 - W_0 (p_1 > 0)
    want = x + 0.1 * torch.sign(model.weight[1] - model.weight[0]).detach()
    assert torch.allclose(fgsm(model, x, torch.tensor([0]), eps=0.1, clip=None), want)


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    x = torch.rand(32, 8)
    return model, x, torch.arange(32) % 3


@pytest.mark.parametrize("autocast", [False, True])
def test_pgd_stays_in_the_ball_and_leaks_nothing_into_the_model(autocast):
    model, x, y = model_and_data()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.no_grad()
    with ctx:
        adv = pgd(model, x, y, eps=0.1, step_size=0.025, steps=10, clip=(0.0, 1.0),
                  generator=torch.Generator().manual_seed(0))
    assert adv.dtype == x.dtype and not adv.requires_grad
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN stats too
    assert all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        one = F.cross_entropy(model(fgsm(model, x, y, eps=0.1, clip=(0.0, 1.0))), y)
        many = F.cross_entropy(model(adv), y)
    assert clean < one < many or (autocast and clean < many)


def test_the_transform_trains_on_its_own_adversarial_examples():
    from sdk.data import IndexedDataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 6, generator=g)
    data = IndexedDataset(x, (x[:, 0] > 0.5).long())
    encoder = sdk.create("encoder", "mlp", in_dim=6, out_dim=2, hidden_dims=(8,))
    attack = AdversarialExamples(eps=0.05, steps=3, seed=0)
    trainer = sdk.Trainer(encoder, sdk.create("objective", "cross_entropy"),
                          functools.partial(torch.optim.SGD, lr=0.1), transforms=[attack],
                          max_steps=6, progress=False, device="cpu")
    trainer.fit(torch.utils.data.DataLoader(data, batch_size=16))
    assert trainer.step == 6
    assert sum(1 for _ in attack.parameters()) == 0  # the model is a reference, not a submodule
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_bad_use_is_named():
    model, x, y = model_and_data()
    with pytest.raises(sdk.RequirementError, match="has no model"):
        AdversarialExamples()(x, Batch(targets=y))
    with pytest.raises(sdk.ShapeError, match=r"needs class ids Batch.targets \[32\], got None"):
        AdversarialExamples().attach(model)(x, Batch(index=torch.arange(32)))
    with pytest.raises(sdk.ConfigError, match="eps, step_size and steps must be >= 0"):
        AdversarialExamples(eps=-1.0)


def test_reverse_gradient_is_the_identity_forward_and_negates_backward():
    from sdk.adversarial import reverse_gradient

    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    out = reverse_gradient(x, 0.3)
    assert torch.equal(out, x)
    grad, = torch.autograd.grad((out * w).sum(), x)
    assert torch.allclose(grad, -0.3 * w)
