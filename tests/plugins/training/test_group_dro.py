"""group_dro: its weights and loss equal a slow transcription of Sagawa et al.'s minibatch
update over several steps, the worst group's weight grows, its state resumes exactly, and on a
synthetic group shift it lowers the worst group's test loss well below ERM's."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk.types import Batch, Loss


def slow_group_dro(steps, num_groups, eta):
    """(weights, loss) per step, from the paper's formulas with Python floats."""
    q = [1.0 / num_groups] * num_groups
    out = []
    for per_sample, groups in steps:
        members = [[float(l) for l, g in zip(per_sample, groups) if g == k] for k in range(num_groups)]
        losses = [sum(m) / len(m) if m else 0.0 for m in members]
        q = [qk * math.exp(eta * lk) for qk, lk in zip(q, losses)]
        q = [qk / sum(q) for qk in q]
        weights = [q[g] / len(members[g]) for g in groups.tolist()]
        out.append((weights, sum(qk * lk for qk, lk in zip(q, losses))))
    return out


def test_weights_and_loss_match_the_paper_over_several_steps():
    g = torch.Generator().manual_seed(0)
    steps = []
    for i in range(6):
        groups = torch.randint(0, 3 if i % 2 else 4, (10,), generator=g)  # group 3 absent every other step
        steps.append((3 * torch.rand(10, generator=g), groups))
    rw = sdk.create("reweighter", "group_dro", num_groups=4, eta=0.5)
    for (per_sample, groups), (weights, loss) in zip(steps, slow_group_dro(steps, 4, 0.5)):
        per_sample = per_sample.clone().requires_grad_()
        reduced = rw.reduce(Loss(value=per_sample.mean(), per_sample=per_sample), Batch(domain=groups))
        grad = torch.autograd.grad(reduced.value, per_sample)[0]  # = the weights: loss is sum w l
        assert torch.allclose(grad, torch.tensor(weights), rtol=1e-5)
        assert reduced.value.item() == pytest.approx(loss, rel=1e-5)


def test_weights_returned_are_q_over_group_counts():
    rw = sdk.create("reweighter", "group_dro", num_groups=2, eta=1.0)
    per_sample = torch.tensor([1.0, 1.0, 1.0, 3.0])
    w = rw.weights(per_sample, Batch(domain=torch.tensor([0, 0, 0, 1])))
    q1 = math.exp(3) / (math.exp(1) + math.exp(3))
    assert torch.allclose(w, torch.tensor([(1 - q1) / 3] * 3 + [q1]))
    assert torch.allclose(rw.q, torch.tensor([1 - q1, q1]))


def test_the_worst_groups_weight_grows_and_evaluation_leaves_it():
    rw = sdk.create("reweighter", "group_dro", num_groups=3)  # the paper's eta = 0.01
    groups = torch.arange(12) % 3
    per_sample = torch.tensor([0.5, 1.0, 2.0]).repeat(4)
    q2 = []
    for _ in range(20):
        rw.weights(per_sample, Batch(domain=groups))
        q2.append(float(rw.q[2]))
    assert all(b > a for a, b in zip(q2, q2[1:])) and q2[0] > 1 / 3
    assert rw.q.argmax() == 2 and rw.q.argmin() == 0
    rw.eval()
    before = rw.q.clone()
    rw.weights(per_sample, Batch(domain=groups))
    assert torch.equal(rw.q, before)


def test_bad_inputs_and_parameters_raise():
    rw = sdk.create("reweighter", "group_dro", num_groups=2)
    with pytest.raises(sdk.RequirementError, match="'group_dro' needs Batch.domain"):
        rw.weights(torch.ones(3), Batch(targets=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(sdk.ShapeError, match=r"group ids in \[0, 2\], but num_groups=2 allows 0 .. 1"):
        rw.weights(torch.ones(3), Batch(domain=torch.tensor([0, 1, 2])))
    with pytest.raises(sdk.ConfigError, match="eta must be > 0, got 0.0"):
        sdk.create("reweighter", "group_dro", eta=0.0)
    with pytest.raises(sdk.ConfigError, match="num_groups must be >= 1, got 0"):
        sdk.create("reweighter", "group_dro", num_groups=0)


def test_group_weights_resume_exactly(tmp_path):
    runs = sdk.testing.check_resume(
        objective=lambda: sdk.create("objective", "cross_entropy"),
        reweighter=lambda: sdk.create("reweighter", "group_dro", num_groups=2, eta=1.0),
        transforms=lambda: [None], tmp_dir=tmp_path)
    q = runs.resumed.reweighter.q
    assert not torch.allclose(q, torch.full((2,), 0.5))  # the state moved, and resumed


def group_shift(n, seed):
    """Labels y, a spurious attribute a equal to y in 95% of samples (the majority groups) and
    flipped in 5%; a weak core feature follows y, a sharp spurious one follows a.
    Groups ``2 y + a``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.where(torch.rand(n, generator=g) < 0.05, 1 - y, y)
    core = (2 * y - 1) + torch.randn(n, generator=g)
    spurious = (2 * a - 1) + 0.1 * torch.randn(n, generator=g)
    x = torch.cat([core[:, None], spurious[:, None], torch.randn(n, 3, generator=g)], 1)
    return x, y, 2 * y + a


def worst_group_test_loss(reweighter):
    x, y, groups = group_shift(1000, 0)
    x_test, y_test, groups_test = group_shift(4000, 1)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(150):
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        loss = Loss(value=per_sample.mean(), per_sample=per_sample)
        if reweighter is not None:
            loss = reweighter.reduce(loss, Batch(domain=groups))
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    with torch.no_grad():
        per_sample = F.cross_entropy(model(x_test), y_test, reduction="none")
    return max(float(per_sample[groups_test == k].mean()) for k in range(4))


def test_lowers_the_worst_group_loss_on_a_group_shift():
    erm = worst_group_test_loss(None)
    dro = worst_group_test_loss(sdk.create("reweighter", "group_dro", num_groups=4))
    assert erm > 1.0  # ERM leans on the spurious feature: the minority groups are misclassified
    assert dro < 0.5 * erm
