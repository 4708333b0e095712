"""model_probe_embedding: embeddings that identify a model by its black-box outputs, the metric
against an explicit double loop, and retrieval of the model trained on the task's distribution
from a small zoo on digits."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from plugins.analysis.model_probe_embedding import (
    model_embedding,
    probe_outputs,
    retrieval_scores,
    task_embedding,
    task_probe_labels,
)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()


def test_copies_share_an_embedding_and_permuted_or_reinitialised_models_do_not():
    probe = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = mlp(0)
    twin = copy.deepcopy(model).train()             # dropout: the probe must run in eval mode
    e, e_twin = model_embedding(probe_outputs(model, probe)), model_embedding(probe_outputs(twin, probe))
    assert torch.equal(e, e_twin) and twin.training
    assert float(e.norm()) == pytest.approx(1.0)
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted[3].weight.copy_(model[3].weight[[2, 0, 1]])
        permuted[3].bias.copy_(model[3].bias[[2, 0, 1]])
    q, q_perm = probe_outputs(model, probe), probe_outputs(permuted, probe)
    assert torch.allclose(q_perm, q[:, [2, 0, 1]])              # same knowledge, other classes
    for other in (permuted, mlp(1)):
        assert float(model_embedding(probe_outputs(other, probe)) @ e) < 0.99
    # by hand: softmax of the logits, flattened in row order, unit norm
    logits = model.eval()(probe).detach()
    flat = [math.exp(v) / sum(math.exp(u) for u in row) for row in logits.tolist() for v in row]
    norm = math.sqrt(sum(v * v for v in flat))
    assert e.tolist() == pytest.approx([v / norm for v in flat], rel=1e-12)


def test_task_labels_are_nearest_query_class_means_and_the_metric_is_the_cosine():
    g = torch.Generator().manual_seed(1)
    query_x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    query_y = torch.tensor([0, 1, 3] * 10)                       # class 2 absent from the query
    probe = torch.randn(12, 2, generator=g, dtype=torch.float64)
    table = task_probe_labels(probe, query_x, query_y, num_classes=4)
    means = {k: [sum(float(query_x[j, d]) for j in range(30) if int(query_y[j]) == k) / 10
                 for d in range(2)] for k in (0, 1, 3)}
    for i in range(12):
        near = min(means, key=lambda k: sum((float(probe[i, d]) - means[k][d]) ** 2 for d in range(2)))
        assert table[i].tolist() == [float(k == near) for k in range(4)]
    outputs = torch.softmax(torch.randn(3, 12, 4, generator=g, dtype=torch.float64), -1)
    labels = table.argmax(1)
    metric = sdk.create("metric", "model_probe_embedding")
    metric.update(outputs[:, :5], labels[:5])
    resumed = sdk.create("metric", "model_probe_embedding")
    resumed.load_state_dict(metric.state_dict())
    scores = retrieval_scores(torch.stack([model_embedding(o) for o in outputs]), task_embedding(table))
    for m in (metric, resumed):
        m.update(outputs[:, 5:], table[5:])                   # class ids or a table: one task
        out = m.compute()
        for k in range(3):
            dot = sum(float(outputs[k, i, labels[i]]) for i in range(12))
            sq = sum(float(v) ** 2 for v in outputs[k].reshape(-1))
            assert out[f"model_{k}"] == pytest.approx(dot / math.sqrt(sq * 12), rel=1e-12)
            assert out[f"model_{k}"] == pytest.approx(float(scores[k]), rel=1e-12)
        assert out["best"] == float(scores.argmax())
    soft = torch.softmax(torch.randn(12, 4, generator=g, dtype=torch.float64), -1)   # soft targets
    metric.reset()
    metric.update(outputs, soft)
    for k in range(3):
        dot = sum(float(outputs[k, i, c] * soft[i, c]) for i in range(12) for c in range(4))
        sq = sum(float(v) ** 2 for v in outputs[k].reshape(-1))
        assert metric.compute()[f"model_{k}"] == pytest.approx(
            dot / math.sqrt(sq * sum(float(v) ** 2 for v in soft.reshape(-1))), rel=1e-12)


def _linear(x, y, classes=10):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=200).fit(x, y)
    model = nn.Linear(x.shape[1], classes).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(clf.coef_))
        model.bias.copy_(torch.from_numpy(clf.intercept_))
    return model


def test_retrieval_puts_the_model_of_the_tasks_distribution_first_on_digits():
    """A zoo of four linear classifiers of digits: trained on the task's distribution, on a
    pixel-shuffled copy of it (another input distribution), with the digit labels permuted
    (another task on the same inputs), and untrained. The task is 200 labelled digits; the probe
    set 300 other digits, unlabelled."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, query, probe = order[:600], order[600:800], order[800:1100]
    pixels, relabel = rng.permutation(64), rng.permutation(10)
    torch.manual_seed(0)
    zoo = [_linear(x[train][:, pixels], y[train]), _linear(x[train], relabel[y[train]]),
           nn.Linear(64, 10).double(), _linear(x[train], y[train])]
    probe_x = torch.from_numpy(x[probe])
    table = task_probe_labels(probe_x, torch.from_numpy(x[query]), torch.from_numpy(y[query]), 10)
    assert (table.argmax(1).numpy() == y[probe]).mean() > 0.8     # the task's class structure
    metric = sdk.create("metric", "model_probe_embedding")
    metric.update(torch.stack([probe_outputs(m, probe_x) for m in zoo]), table.argmax(1))
    out = metric.compute()
    assert out["best"] == 3
    others = max(out[f"model_{k}"] for k in range(3))
    assert out["model_3"] > 0.8 and out["model_3"] > others + 0.4


def test_bad_input_names_plugin_and_field():
    metric = sdk.create("metric", "model_probe_embedding")
    probs = torch.full((2, 4, 3), 1 / 3)
    with pytest.raises(sdk.errors.ShapeError, match=r"model_probe_embedding: outputs must be floating \[M, P, C\]"):
        metric.update(probs[0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match=r"model_probe_embedding: task class ids must be \[4\]"):
        metric.update(probs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(sdk.errors.ShapeError, match=r"model_probe_embedding: task must be"):
        metric.update(probs, torch.zeros(4, 2))
    metric.update(probs, torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match="number of models"):
        metric.update(probs[:1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.errors.ShapeError, match="one width"):
        task_probe_labels(torch.randn(3, 2), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(sdk.errors.ShapeError, match="beyond num_classes"):
        task_probe_labels(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2, 5]), 3)
    with pytest.raises(sdk.errors.ShapeError, match=r"class scores \[P, C\]"):
        probe_outputs(nn.Flatten(0), torch.randn(3, 2))
    nan = sdk.create("metric", "model_probe_embedding")
    nan.update(torch.full((1, 2, 2), math.nan), torch.zeros(2, dtype=torch.long))
    assert math.isnan(nan.compute()["model_0"]) and math.isnan(nan.compute()["best"])
