"""knn_accuracy against an explicit weighted-vote loop, scikit-learn and an analytic case."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import sdk
from plugins.metrics.knn_accuracy import knn_accuracy, knn_predict


def slow_knn(train, train_y, test, k, t):
    preds = []
    for q in test.tolist():
        nq = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, y in zip(train.tolist(), train_y.tolist()):
            nx = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x)) / (nq * nx), y))
        votes = {}
        for s, y in sorted(sims, reverse=True)[:k]:
            votes[y] = votes.get(y, 0.0) + math.exp(s / t)
        best = max(votes.values())
        preds.append(min(c for c, v in votes.items() if v == best))
    return preds


def clusters(seed, n_train=120, n_test=40, d=8, c=4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    train_y = torch.randint(0, c, (n_train,), generator=g)
    test_y = torch.randint(0, c, (n_test,), generator=g)
    noise = lambda n: 1.2 * torch.randn(n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return centres[train_y] + noise(n_train), train_y, centres[test_y] + noise(n_test), test_y


@pytest.mark.parametrize(("k", "t"), [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_matches_loop_and_sklearn(k, t):
    train, train_y, test, test_y = clusters(k)
    expected = slow_knn(train, train_y, test, k, t)
    assert knn_predict(train, train_y, test, k=k, temperature=t, chunk_size=7).tolist() == expected
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                              weights=lambda d: np.exp((1 - d) / t)).fit(train.numpy(), train_y.numpy())
    assert sk.predict(test.numpy()).tolist() == expected
    acc = float(np.mean(np.array(expected) == test_y.numpy()))
    assert knn_accuracy(train, train_y, test, test_y, k=k, temperature=t) == pytest.approx(acc)
    metric = sdk.create("metric", "knn_accuracy", k=k, temperature=t)
    metric.fit(train, train_y)
    metric.update(test[:15], test_y[:15])
    metric.update(test[15:], test_y[15:])
    assert metric.compute() == pytest.approx(acc)


def test_temperature_weighs_close_neighbours():
    # one class-0 neighbour at similarity 0.99 against two class-1 neighbours at 0.5
    angle = lambda s: [s, math.sqrt(1 - s * s)]  # noqa: E731
    train = torch.tensor([angle(0.99), angle(0.5), [0.5, -math.sqrt(0.75)]])
    train_y = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # exp(0.99/0.07) > 2 exp(0.5/0.07), but exp(0.99/10) < 2 exp(0.5/10)
    assert knn_predict(train, train_y, query, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(train, train_y, query, k=3, temperature=10.0).tolist() == [1]
    assert knn_predict(train, train_y, query, k=1, temperature=10.0).tolist() == [0]


def test_k_larger_than_the_bank_uses_all_of_it():
    train, train_y, test, test_y = clusters(0, n_train=10)
    assert knn_predict(train, train_y, test, k=50).tolist() == slow_knn(train, train_y, test, 10, 0.07)


def test_bad_parameters():
    with pytest.raises(sdk.ConfigError, match="k must be >= 1"):
        sdk.create("metric", "knn_accuracy", k=0)
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        knn_accuracy(torch.randn(4, 2), torch.arange(4), torch.randn(2, 2), torch.arange(2), temperature=0.0)
    with pytest.raises(sdk.ShapeError, match="differ in dimension"):
        knn_accuracy(torch.randn(4, 2), torch.arange(4), torch.randn(2, 3), torch.arange(2))
