"""sam: a Trainer with the callback ends where a hand-written two-pass SAM loop ends (and far
from plain training); rho = 0 is plain training, bitwise, with random views and batch norm."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk.data import GaussianNoise, IndexedDataset

X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
Y = torch.arange(64) % 3


def model(batch_norm=False):
    torch.manual_seed(1)
    return sdk.create("encoder", "mlp", in_dim=6, out_dim=3, hidden_dims=(16,), batch_norm=batch_norm)


def train(encoder, callbacks=(), steps=8, **kwargs):
    loader = torch.utils.data.DataLoader(IndexedDataset(X, Y), batch_size=16)  # in order
    sdk.Trainer(encoder, sdk.create("objective", "cross_entropy"),
                functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), callbacks=list(callbacks),
                max_steps=steps, progress=False, device="cpu", **kwargs).fit(loader)
    return encoder


def hand_written_sam(encoder, rho, steps=8):
    params = list(encoder.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in range(steps):
        rows = slice(16 * (step % 4), 16 * (step % 4) + 16)
        x, y = X[rows], Y[rows]
        grads = torch.autograd.grad(F.cross_entropy(encoder(x), y), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p += rho * g / (norm + 1e-12)
        opt.zero_grad()
        F.cross_entropy(encoder(x), y).backward()  # the gradient at w + e ...
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        opt.step()  # ... applied at w
    return encoder


def test_equals_a_hand_written_two_pass_sam_and_differs_from_plain_training():
    start = model()
    with_sam = train(copy.deepcopy(start), [sdk.create("callback", "sam", rho=0.05)])
    by_hand = hand_written_sam(copy.deepcopy(start), rho=0.05)
    plain = train(copy.deepcopy(start))
    for a, b in zip(with_sam.parameters(), by_hand.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    gap = max(float((a - c).detach().abs().max()) for a, c in zip(with_sam.parameters(), plain.parameters()))
    assert gap > 1e-3


def test_rho_zero_is_plain_training_bitwise_with_random_views_and_batch_norm():
    start = model(batch_norm=True)
    with_sam = train(copy.deepcopy(start), [sdk.create("callback", "sam", rho=0.0)],
                     transforms=GaussianNoise(0.3))
    plain = train(copy.deepcopy(start), transforms=GaussianNoise(0.3))
    sam_state, plain_state = with_sam.state_dict(), plain.state_dict()
    assert any("running_mean" in k for k in sam_state)
    for key in plain_state:  # weights, and batch-norm statistics updated once per step
        assert torch.equal(sam_state[key], plain_state[key]), key


def test_bad_rho_and_gradient_accumulation_raise():
    with pytest.raises(sdk.ConfigError, match="sam: rho must be >= 0, got -0.1"):
        sdk.create("callback", "sam", rho=-0.1)
    with pytest.raises(sdk.ConfigError, match="callback .sam. needs accumulate=1"):
        train(model(), [sdk.create("callback", "sam")], accumulate=2)
