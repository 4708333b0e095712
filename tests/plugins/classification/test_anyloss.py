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


def graph_anyloss(z, y, metric="f1", amplifier=73.0, beta=1.0):
    # the plain formula through autograd: amplified probabilities and the four written-out sums
    from plugins.classification.anyloss import metric_value

    if z.shape[1] == 1:
        p, onehot = torch.sigmoid(z), y[:, None].to(z.dtype)
    elif y.dim() == 1:
        p, onehot = z.softmax(-1), F.one_hot(y, z.shape[1]).to(z.dtype)
    else:
        p, onehot = torch.sigmoid(z), y.to(z.dtype)
    a = torch.sigmoid(amplifier * (p - 0.5))
    counts = ((onehot * a).sum(0), (onehot * (1 - a)).sum(0), ((1 - onehot) * a).sum(0),
              ((1 - onehot) * (1 - a)).sum(0))
    return 1 - metric_value(metric, *counts, beta=beta).mean()


@pytest.mark.parametrize("kind", ["ids", "multilabel", "binary"])
def test_closed_form_gradient_equals_the_autograd_graph(kind):
    from plugins.classification.anyloss import _AmplifiedSums

    g = torch.Generator().manual_seed(3)
    c = {"ids": 4, "multilabel": 4, "binary": 1}[kind]
    y = (torch.randint(0, 4, (7,), generator=g) if kind == "ids"
         else (torch.rand(7, c, generator=g) > 0.5).double())
    z = torch.randn(7, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, c, generator=g, dtype=torch.float64)
    softmax = kind == "ids"
    assert torch.autograd.gradcheck(
        lambda z: torch.stack(_AmplifiedSums.apply(z, y, 5.0, softmax)).mul(w).sum(), (z,))
    for metric, amplifier, c in [("f1", 73.0, 3), ("gmean", 4.0, 40), ("balanced_accuracy", 73.0, 1),
                                 ("accuracy", 10.0, 3), ("fbeta", 8.0, 3)]:
        n = 256
        z = 0.5 * torch.randn(n, c, generator=g)
        y = ((torch.rand(n, c, generator=g) > 0.7).long() if kind == "multilabel" and c > 1
             else torch.randperm(n, generator=g) % max(c, 2))  # every class present
        for dtype in (torch.float32, torch.bfloat16):
            zd = z.to(dtype).requires_grad_()
            got = loss(metric, zd, y, amplifier=amplifier, beta=2.0)
            want = graph_anyloss(zd.float(), y, metric, amplifier, beta=2.0)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
            g1, g2 = (torch.autograd.grad(t, zd)[0] for t in (got, want))
            assert g1.dtype == dtype and g2.abs().max() > 1e-5  # not saturated: a real comparison
            assert torch.allclose(g1.float(), g2.float(), rtol=1e-4 if dtype == torch.float32 else 2e-2,
                                  atol=1e-4 * g2.abs().max().item())


WORKER = """
import sys, torch, sdk
from sdk import distributed
distributed.init("gloo")
r = distributed.rank()
for name, z, y, kw in torch.load(sys.argv[1]):
    z = z.chunk(2)[r].clone().requires_grad_()
    value = sdk.create("objective", "anyloss", **kw)(sdk.Views(logits=z), sdk.Batch(targets=y.chunk(2)[r])).value
    value.backward()
    torch.save((value.detach(), z.grad), f"{sys.argv[2]}/{name}-{r}.pt")
"""


def test_gathered_sums_on_two_ranks_equal_one_process(tmp_path):
    # each target kind on two gloo ranks of 12 samples: every rank's loss is the whole batch's,
    # a rank's gradient is world x its share of the single process's (DDP then averages)
    from sdk.testing import run_ranks

    g = torch.Generator().manual_seed(4)
    cases = [("ids", torch.randn(24, 5, generator=g, dtype=torch.float64),
              torch.randint(0, 5, (24,), generator=g), {"amplifier": 5.0}),
             ("multilabel", torch.randn(24, 5, generator=g, dtype=torch.float64),
              (torch.rand(24, 5, generator=g) > 0.5).long(), {"metric": "gmean", "amplifier": 5.0}),
             ("binary", torch.randn(24, 1, generator=g, dtype=torch.float64),
              torch.randint(0, 2, (24,), generator=g), {"metric": "accuracy"})]
    torch.save(cases, tmp_path / "cases.pt")
    import os
    import sys

    root = os.path.dirname(os.path.dirname(sdk.__file__))
    run_ranks([sys.executable, "-c", WORKER, str(tmp_path / "cases.pt"), str(tmp_path)],
              env={"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])})
    for name, z, y, kw in cases:
        z = z.clone().requires_grad_()
        want = loss(kw.get("metric", "f1"), z, y, **{k: v for k, v in kw.items() if k != "metric"})
        grad = torch.autograd.grad(want, z)[0]
        for r in range(2):
            value, rank_grad = torch.load(tmp_path / f"{name}-{r}.pt")
            assert torch.allclose(value, want, rtol=1e-12), name
            assert grad.abs().max() > 1e-6
            assert torch.allclose(rank_grad / 2, grad.chunk(2)[r], rtol=1e-9, atol=1e-15), name
