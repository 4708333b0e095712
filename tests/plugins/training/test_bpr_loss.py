"""bpr_loss: the loss and its gradient equal -log sigmoid(s_ui - s_uj) written out per triple,
tied scores cost log 2, and matrix factorisation trained with it ranks held-out interactions of a
low-rank preference model above non-interactions (AUC), which the reversed difference does not."""

import math

import pytest
import torch

import sdk
from plugins.training.bpr_loss import bpr_loss
from sdk.types import Batch, Views


def test_loss_and_gradient_equal_the_formula_per_triple():
    obj = sdk.create("objective", "bpr_loss")
    s = torch.tensor([[2.0, 0.5, -1.0, 3.0], [-0.3, 0.7, 0.1, -2.0], [0.0, 0.0, 4.0, 1.0]],
                     dtype=torch.float64, requires_grad=True)
    loss = obj(Views(logits=s), Batch())
    want, grad = [], torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        terms = []
        for j in range(1, 4):
            d = float((s[b, 0] - s[b, j]).detach())
            terms.append(-math.log(1 / (1 + math.exp(-d))))
            g = -(1 - 1 / (1 + math.exp(-d))) / 3 / 3  # d(-log sigmoid(d))/dd, mean over K and B
            grad[b, 0] += g
            grad[b, j] -= g
        want.append(sum(terms) / 3)
    assert torch.allclose(loss.per_sample, torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(loss.value, torch.tensor(sum(want) / 3, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(torch.autograd.grad(loss.value, s)[0], grad, rtol=1e-10)


def test_one_negative_per_row_and_tied_scores():
    obj = sdk.create("objective", "bpr_loss")
    assert torch.allclose(obj(Views(logits=torch.zeros(5, 2)), Batch()).value, torch.tensor(math.log(2)))
    pos, neg = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(bpr_loss(pos, neg), torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(3))]))


def low_rank_interactions(users=60, items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pref = torch.randn(users, 3, generator=g) @ torch.randn(3, items, generator=g)
    liked = pref > pref.quantile(0.8, dim=1, keepdim=True)  # each user's top 20 % items
    held_out = liked & (torch.rand(users, items, generator=g) < 0.3)
    return liked & ~held_out, held_out, ~liked, g


def auc_after_bpr_mf(sign, steps=150):
    train, held_out, unliked, g = low_rank_interactions()
    u = (0.1 * torch.randn(60, 8, generator=g)).requires_grad_()
    v = (0.1 * torch.randn(40, 8, generator=g)).requires_grad_()
    obj = sdk.create("objective", "bpr_loss")
    opt = torch.optim.Adam([u, v], lr=0.05)
    users, items = train.nonzero(as_tuple=True)
    for _ in range(steps):
        neg = torch.randint(0, 40, (users.numel(),), generator=g)
        s_pos, s_neg = (u[users] * v[items]).sum(1), (u[users] * v[neg]).sum(1)
        loss = obj(Views(logits=sign * torch.stack([s_pos, s_neg], 1)), Batch())
        opt.zero_grad()
        (loss.value + 1e-3 * (u.square().sum() + v.square().sum())).backward()
        opt.step()
    scores = (u @ v.T).detach()
    pos, neg = scores[held_out], scores[unliked]
    return float((pos[:, None] > neg[None]).float().mean())


def test_matrix_factorisation_trained_with_bpr_ranks_held_out_interactions_first():
    assert auc_after_bpr_mf(+1.0) > 0.85
    assert auc_after_bpr_mf(-1.0) < 0.3  # -log sigmoid(s_uj - s_ui) learns the reverse ranking


def test_bad_inputs_are_named():
    obj = sdk.create("objective", "bpr_loss")
    with pytest.raises(sdk.ShapeError, match=r"bpr_loss.*\[B, 1 \+ K\].*got \[4, 1\]"):
        obj(Views(logits=torch.zeros(4, 1)), Batch())
    with pytest.raises(sdk.ShapeError, match=r"bpr_loss.*got \[4, 3, 2\]"):
        obj(Views(logits=torch.zeros(4, 3, 2)), Batch())
    with pytest.raises(sdk.RequirementError, match="bpr_loss"):
        obj(Views(embeddings=(torch.zeros(4, 2),)), Batch())
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert torch.isnan(obj(Views(logits=torch.tensor([[0.0, bad]])), Batch()).value)


def test_conformance():
    sdk.testing.check_plugin("objective", "bpr_loss", fuzz=0)
