"""active_self_paced: the self-paced selection and the margin queries against loops, the pace,
the callback's rounds (oracle labels kept, pseudo-labels replaced) and its loss term, the
reweighter's hard weights, and ASPL against self-paced learning alone on digits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import sdk
from plugins.training.active_self_paced import (
    aspl_round,
    class_losses,
    initial_age,
    margin_query,
    self_paced_select,
)
from sdk import keys
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.events import State


def test_class_losses_are_one_vs_rest_logistic_losses():
    s = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = class_losses(s)
    for i in range(5):
        for j in range(4):
            want = sum(-F.logsigmoid(s[i, k] if k == j else -s[i, k]) for k in range(4))
            assert got[i, j].item() == pytest.approx(want.item(), rel=1e-12)


def test_selection_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    s = 3 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    lam = 1.5
    labels, v = self_paced_select(s, lam)
    l = class_losses(s)
    for i in range(40):
        j = min(range(5), key=lambda c: l[i, c].item())
        ok = l[i, j].item() < lam and sum(s[i, c].item() > 0 for c in range(5)) == 1
        assert v[i].item() == float(ok)
        assert labels[i].item() == (j if ok else -1)
    assert 0 < v.sum() < 40


def test_margin_queries_match_a_loop():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(30, 4, generator=g)
    known = torch.rand(30, generator=g) < 0.3
    q = margin_query(s, 6, known)
    top = s.sort(1, descending=True).values
    want = sorted((i for i in range(30) if not known[i]), key=lambda i: (top[i, 0] - top[i, 1]).item())[:6]
    assert q.tolist() == want
    assert margin_query(s, 100, known).numel() == int((~known).sum())


def test_round_and_initial_age():
    s = torch.tensor([[4.0, -4, -4], [-4, 4, -4], [1.0, 0.9, -3], [-4, -4, 4.0]])
    known = torch.tensor([False, False, False, True])
    lam = initial_age(s, 0.5)
    best = sorted(min(class_losses(s)[i].tolist()) for i in range(4))
    assert lam.item() == pytest.approx((best[1] + best[2]) / 2)
    out = aspl_round(s, known, 1.0, m=1)
    assert out.labels.tolist() == [0, 1, -1, -1]  # row 2 has two positive heads; row 3 is known
    assert out.query.tolist() == [2]


class _Trainer:
    device = torch.device("cpu")

    def __init__(self, scores, oracle):
        self.scores, self.oracle = scores, oracle
        self.unlabeled_loader = DataLoader(list(range(len(oracle))))

    def embed(self, loader, with_targets=False):
        return self.scores, self.oracle


def test_callback_rounds_keep_oracle_labels_and_replace_pseudo_labels():
    cb = sdk.create("callback", "active_self_paced", queries=1, pace=2.0, quantile=0.5, weight=3.0)
    s = torch.tensor([[4.0, -4, -4], [-4, 4, -4], [1.0, 0.9, -3], [-4, -3, 3.0]])
    oracle = torch.tensor([0, 1, 1, 2])
    trainer = _Trainer(s, oracle)
    cb.on_fit_start(State(trainer=trainer, model=None))
    lam0 = class_losses(s).min(1).values.quantile(0.5)
    assert cb.lam.item() == pytest.approx(2 * lam0.item())
    assert cb.known.tolist() == [False, False, True, False]
    assert cb.targets.tolist() == [0, 1, 1, -1]  # row 2 from the oracle (its true class 1)
    trainer.scores = torch.tensor([[-4.0, 4, -4], [-4, 4, -4], [4.0, -4, -4], [-4, -4, 4.0]])
    cb.on_epoch_end(State(trainer=trainer, model=None))
    assert cb.lam.item() == pytest.approx(4 * lam0.item())
    assert cb.targets[2].item() == 1  # oracle labels stay, whatever the model now says
    assert cb.targets[0].item() == 1  # pseudo-labels are re-estimated
    assert cb.known.sum().item() == 2
    z = torch.randn(3, 3, requires_grad=True)
    state = State(trainer=trainer, model=None)
    state.views = sdk.Views(logits=torch.zeros(2, 3), extras={keys.UNLABELED: (z,),
                                                               keys.UNLABELED_INDEX: torch.tensor([0, 2, 3])})
    state.loss = sdk.Loss(value=torch.tensor(1.0))
    cb.after_loss(state)
    t = cb.targets[torch.tensor([0, 2, 3])]
    want = sum(class_losses(z)[i, t[i]] for i in range(3) if t[i] >= 0) / 3
    assert state.loss.value.item() == pytest.approx(1.0 + 3.0 * want.item(), rel=1e-6)
    fresh = sdk.create("callback", "active_self_paced")
    fresh.load_state_dict(cb.state_dict())
    assert fresh.targets.tolist() == cb.targets.tolist() and fresh.lam == cb.lam


def test_defaults_and_bad_input():
    cb = sdk.create("callback", "active_self_paced")
    assert (cb.queries, cb.pace, cb.quantile, cb.weight) == (10, 1.15, 0.2, 1.0)
    rw = sdk.create("reweighter", "active_self_paced")
    assert (rw.pace, rw.quantile, rw.every) == (1.15, 0.2, 100)
    with pytest.raises(ConfigError, match="pace"):
        sdk.create("callback", "active_self_paced", pace=0.5)
    with pytest.raises(ConfigError, match="quantile"):
        sdk.create("reweighter", "active_self_paced", quantile=0.0)
    with pytest.raises(ShapeError, match="active_self_paced"):
        cb.round(torch.randn(4, 3), torch.arange(3), torch.arange(4))
    with pytest.raises(RequirementError, match="active_self_paced.*unlabeled"):
        cb.on_fit_start(State(trainer=type("T", (), {"unlabeled_loader": None})(), model=None))


def test_reweighter_hard_weights_and_pace():
    rw = sdk.create("reweighter", "active_self_paced", pace=2.0, quantile=0.5, every=2)
    rw.train()
    l = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0])
    lam = l.quantile(0.5).item()
    batch = sdk.Batch(targets=torch.zeros(5, dtype=torch.long))
    for step, want_lam in enumerate([lam, lam, 2 * lam, 2 * lam, 4 * lam]):
        w = rw.weights(l, batch)
        assert w.tolist() == [float(x < want_lam) for x in l.tolist()], step
    value = rw.reduce(sdk.Loss(value=l.mean(), per_sample=l.clone().requires_grad_()), batch).value
    assert value.item() == pytest.approx(l[l < 4 * lam].mean().item())


def test_aspl_beats_self_paced_learning_alone_on_digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)

    def fit(x, t):
        W = torch.zeros(64, 10, requires_grad=True)
        b = torch.zeros(10, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = class_losses(x @ W + b).gather(1, t[:, None]).mean() + 1e-3 * (W ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return lambda z: (z @ W + b).detach()

    def run(seed, queries):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        test, pool = perm[:597], perm[597:]
        xp, yp = X[pool], y[pool]
        cb = sdk.create("callback", "active_self_paced", queries=queries)
        cb.known = torch.zeros(len(pool), dtype=torch.bool)
        for c in range(10):  # 5 labels per class to start
            cb.known[(yp == c).nonzero()[:5, 0]] = True
        cb.targets = torch.where(cb.known, yp, -1)
        for _ in range(10):
            use = cb.targets >= 0
            cb.round(fit(xp[use], cb.targets[use])(xp), torch.arange(len(pool)), yp)
        use = cb.targets >= 0
        return (fit(xp[use], cb.targets[use])(X[test]).argmax(1) == y[test]).float().mean().item()

    aspl = sum(run(s, 10) for s in range(2)) / 2
    spl = sum(run(s, 0) for s in range(2)) / 2
    assert aspl >= spl + 0.1, (aspl, spl)
    assert aspl > 0.9, aspl


def test_callback_resumes_bit_for_bit(tmp_path):
    from sdk.testing import check_resume

    runs = check_resume(objective=lambda: sdk.create("objective", "cross_entropy"), tmp_dir=tmp_path,
                        callbacks=lambda: [sdk.create("callback", "active_self_paced", queries=3)],
                        mu=2, steps=8, num_samples=16)
    cb = runs.resumed.callbacks[0]
    assert cb.rounds >= 2 and cb.known.sum() == 3 * cb.rounds


def test_reweighter_resumes_bit_for_bit(tmp_path):
    from sdk.testing import check_resume

    check_resume(objective=lambda: sdk.create("objective", "cross_entropy"), tmp_dir=tmp_path,
                 reweighter=lambda: sdk.create("reweighter", "active_self_paced", quantile=0.5, every=2))
