"""anyloss: with hard 0/1 predictions the loss is 1 - scikit-learn's metric; against a written-out
soft confusion matrix (value and gradient); higher F1 than cross-entropy on imbalanced data."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, fbeta_score

import sdk

Y = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0])
PRED = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0])  # TPR 3/4, TNR 5/8


def loss(metric, logits, targets, **kw):
    return sdk.create("objective", "anyloss", metric=metric, **kw)(sdk.Views(logits=logits),
                                                                   sdk.Batch(targets=targets)).value


def gmean(y, p):
    tn, fp, fn, tp = confusion_matrix(y, p).ravel()
    return math.sqrt(tp / (tp + fn) * tn / (tn + fp))


@pytest.mark.parametrize(("metric", "reference"), [
    ("f1", f1_score), ("accuracy", accuracy_score), ("balanced_accuracy", balanced_accuracy_score),
    ("gmean", gmean), ("fbeta", lambda y, p: fbeta_score(y, p, beta=2.0))])
def test_hard_binary_predictions_give_one_minus_the_metric(metric, reference):
    logits = (2 * PRED - 1).double()[:, None] * 1e3  # sigmoid(+-1000) is exactly 1 / 0
    want = 1 - reference(Y.numpy(), PRED.numpy())
    assert loss(metric, logits, Y, beta=2.0).item() == pytest.approx(want, abs=1e-12)


def test_hard_multiclass_predictions_give_one_minus_the_macro_f1():
    y, pred = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1]), torch.tensor([0, 2, 2, 2, 1, 1, 0, 1])
    logits = 1e3 * F.one_hot(pred, 3).double()
    assert loss("f1", logits, y).item() == pytest.approx(1 - f1_score(y, pred, average="macro"), abs=1e-12)
    sets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    hits = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    got = loss("f1", (2 * hits - 1).double() * 1e3, sets)
    assert got.item() == pytest.approx(1 - f1_score(sets, hits, average="macro"), abs=1e-12)


def test_soft_confusion_matches_loop_with_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 1, generator=g, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(10, generator=g) > 0.5).long()
    tp = fn = fp = 0.0
    for i in range(10):
        a = 1 / (1 + torch.exp(-73 * (1 / (1 + torch.exp(-z[i, 0])) - 0.5)))
        tp, fn, fp = (tp + a, fn + 1 - a, fp) if y[i] == 1 else (tp, fn, fp + a)
    want = 1 - 2 * tp / (2 * tp + fn + fp)
    got = loss("f1", z, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    g1, g2 = (torch.autograd.grad(t, z)[0] for t in (got, want))
    assert torch.allclose(g1, g2, rtol=1e-10)
    # the gradient pushes positives' logits up (where they are not yet saturated)
    assert (g1[y == 1] <= 0).all() and (g1[y == 0] >= 0).all()


def _f1(objective, x, y, labels, train, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(30, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        objective(model(x[train]), labels[train]).backward()
        opt.step()
    with torch.no_grad():
        return f1_score(y[~train], (model(x[~train])[:, 0] > 0).long().numpy())


def test_higher_f1_than_cross_entropy_on_imbalanced_breast_cancer():
    # 20 malignant among 357 benign; a linear model, 100 full-batch Adam steps, 5 random subsets
    from sklearn.datasets import load_breast_cancer

    x0, y0 = load_breast_cancer(return_X_y=True)
    y0 = 1 - y0  # malignant is the positive class
    any_loss = sdk.create("objective", "anyloss")
    scores = {"anyloss": [], "ce": []}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        keep = np.concatenate([np.where(y0 == 0)[0], rng.choice(np.where(y0 == 1)[0], 20, replace=False)])
        rng.shuffle(keep)
        x, y = x0[keep], y0[keep]
        x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
        train = np.arange(len(y)) < len(y) // 2
        labels = torch.tensor(y)

        data = (x, y, labels, train, seed)
        scores["anyloss"].append(_f1(lambda z, t: any_loss(sdk.Views(logits=z), sdk.Batch(targets=t)).value, *data))
        scores["ce"].append(_f1(lambda z, t: F.binary_cross_entropy_with_logits(z[:, 0], t.float()), *data))
    assert np.mean(scores["anyloss"]) > np.mean(scores["ce"]) + 0.1, scores


def test_errors():
    with pytest.raises(sdk.ShapeError, match=r"anyloss: Batch.targets must lie in \[0, 2\)"):
        loss("f1", torch.zeros(3, 1), torch.tensor([0, 2, 1]))
    with pytest.raises(sdk.ShapeError, match="anyloss: with one logit Batch.targets must be class ids"):
        loss("f1", torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(sdk.ConfigError, match="metric must be"):
        sdk.create("objective", "anyloss", metric="auc")
