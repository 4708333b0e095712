"""zero_shot_pseudolabel: class-balanced top-k against a loop, the growing budget, the callback's
rounds (zero-shot scores first, then the model's, all labels replaced) and its loss term, and
iterative refinement on digits beating the zero-shot classifier it starts from."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import sdk
from plugins.training.zero_shot_pseudolabel import per_class_budget, top_k_per_class
from sdk import keys
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.events import State


def slow_top_k(scores, k):
    p = scores.softmax(-1)
    labels = [-1] * p.shape[0]
    for c in range(p.shape[1]):
        mine = [i for i in range(p.shape[0]) if p[i].argmax().item() == c]
        for i in sorted(mine, key=lambda i: -p[i, c].item())[:k]:
            labels[i] = c
    return labels


@pytest.mark.parametrize("k", [0, 1, 3, 50])
def test_top_k_per_class_matches_a_loop(k):
    s = torch.randn(40, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    got = top_k_per_class(s, k)
    assert got.tolist() == slow_top_k(s, k)
    counts = torch.bincount(got[got >= 0], minlength=4)
    predicted = torch.bincount(s.argmax(1), minlength=4)
    assert counts.tolist() == torch.minimum(predicted, torch.tensor(k)).tolist()


def test_budget_grows_to_the_whole_pool():
    assert [per_class_budget(t, 1000, 10, 10) for t in (1, 2, 5, 10, 11)] == [10, 20, 50, 100, 100]
    assert per_class_budget(1, 95, 10, 10) == 0  # floor(9.5) // 10


class _Trainer:
    device = torch.device("cpu")

    def __init__(self, scores):
        self.scores = scores
        self.unlabeled_loader = DataLoader(list(range(scores.shape[0])))

    def embed(self, loader):
        return self.scores


def loss_state(trainer, z, index):
    state = State(trainer=trainer, model=None)
    state.views = sdk.Views(logits=torch.zeros(2, 2), extras={keys.UNLABELED: (z,),
                                                               keys.UNLABELED_INDEX: index})
    state.loss = sdk.Loss(value=torch.tensor(1.0))
    return state


def test_callback_rounds_and_loss():
    zero_shot = torch.tensor([[3.0, 0], [2.0, 0], [1.0, 0], [0, 3.0], [0, 1.0], [0, 2.0]])
    model = -zero_shot  # the model disagrees everywhere
    cb = sdk.create("callback", "zero_shot_pseudolabel", rounds=3, weight=2.0, zero_shot=zero_shot)
    trainer = _Trainer(model)
    cb.on_fit_start(State(trainer=trainer, model=None))  # round 1: k = floor(6/3)//2 = 1
    assert cb.labels.tolist() == [0, -1, -1, 1, -1, -1]
    z = torch.randn(3, 2, requires_grad=True)
    state = loss_state(trainer, z, torch.tensor([0, 1, 3]))
    cb.after_loss(state)
    want = (F.cross_entropy(z[0:1], torch.tensor([0])) + F.cross_entropy(z[2:3], torch.tensor([1]))) / 2
    assert state.loss.value.item() == pytest.approx(1.0 + 2.0 * want.item(), rel=1e-6)
    cb.on_epoch_end(State(trainer=trainer, model=None))  # round 2 from the model's scores: k = 2
    assert cb.labels.tolist() == [1, 1, -1, 0, -1, 0]  # replaced, not accumulated
    for _ in range(3):
        cb.on_epoch_end(State(trainer=trainer, model=None))
    assert cb.round == 3 and (cb.labels >= 0).all()
    z = torch.randn(4, 2, requires_grad=True)
    index = torch.tensor([5, 0, 2, 3])
    state = loss_state(trainer, z, index)
    cb.after_loss(state)
    t = cb.labels[index]
    want = sum(F.cross_entropy(z[i:i + 1], t[i:i + 1]) for i in range(4)) / 4
    assert state.loss.value.item() == pytest.approx(1.0 + 2.0 * want.item(), rel=1e-6)
    fresh = sdk.create("callback", "zero_shot_pseudolabel")
    fresh.load_state_dict(cb.state_dict())
    assert fresh.labels.tolist() == cb.labels.tolist() and fresh.round == 3


def test_defaults_and_bad_input():
    cb = sdk.create("callback", "zero_shot_pseudolabel")
    assert (cb.rounds, cb.weight, cb.view, cb.zero_shot) == (10, 1.0, 0, None)
    with pytest.raises(ConfigError, match="rounds"):
        sdk.create("callback", "zero_shot_pseudolabel", rounds=0)
    with pytest.raises(ShapeError, match="zero_shot_pseudolabel.*zero_shot"):
        sdk.create("callback", "zero_shot_pseudolabel", zero_shot=torch.zeros(5))
    with pytest.raises(ShapeError, match="zero_shot_pseudolabel.*6 items"):
        sdk.create("callback", "zero_shot_pseudolabel", zero_shot=torch.zeros(5, 2)).on_fit_start(
            State(trainer=_Trainer(torch.zeros(6, 2)), model=None))
    with pytest.raises(ShapeError, match="zero_shot_pseudolabel"):
        cb.refine(torch.zeros(4, 2), torch.arange(3))
    with pytest.raises(RequirementError, match="zero_shot_pseudolabel.*unlabeled"):
        cb.on_fit_start(State(trainer=type("T", (), {"unlabeled_loader": None})(), model=None))


def test_iterative_refinement_beats_the_zero_shot_classifier_on_digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)

    def fit(x, t):
        W = torch.zeros(64, 10, requires_grad=True)
        b = torch.zeros(10, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ W + b, t) + 1e-3 * (W ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return lambda z: (z @ W + b).detach()

    start, end, precision, pool_acc = [], [], [], []
    for seed in range(3):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        test, pool = perm[:597], perm[597:]
        xp, yp = X[pool], y[pool]
        # a weak "zero-shot" classifier: cosine to the mean of 3 exemplars per class
        protos = F.normalize(torch.stack([xp[(yp == c).nonzero()[:3, 0]].mean(0) for c in range(10)]), dim=1)
        zero_shot = lambda z, protos=protos: 10 * F.normalize(z, dim=1) @ protos.T  # noqa: E731
        start.append((zero_shot(X[test]).argmax(1) == y[test]).float().mean().item())
        cb = sdk.create("callback", "zero_shot_pseudolabel")
        scores = zero_shot(xp)
        for t in range(cb.rounds):
            labels = cb.refine(scores, torch.arange(len(pool)))
            kept = labels >= 0
            if t == 0:
                precision.append((labels[kept] == yp[kept]).float().mean().item())
                pool_acc.append((scores.argmax(1) == yp).float().mean().item())
            model = fit(xp[kept], labels[kept])
            scores = model(xp)
        end.append((model(X[test]).argmax(1) == y[test]).float().mean().item())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print("zero-shot", start, "refined", end, "round-1 precision", precision, "pool acc", pool_acc)
    assert mean(end) >= mean(start) + 0.02, (start, end)
    assert mean(precision) >= mean(pool_acc) + 0.05, (precision, pool_acc)


def test_resumes_bit_for_bit(tmp_path):
    from sdk.testing import check_resume

    runs = check_resume(objective=lambda: sdk.create("objective", "cross_entropy"), tmp_dir=tmp_path,
                        callbacks=lambda: [sdk.create("callback", "zero_shot_pseudolabel", rounds=4)],
                        mu=2, steps=8, num_samples=16)
    assert runs.resumed.callbacks[0].round >= 2
