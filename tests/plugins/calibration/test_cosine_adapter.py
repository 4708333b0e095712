"""cosine_adapter: with one query embedding for every pair the MLP's output is a constant and
the fit is exactly Platt scaling of the cosine (an unregularised logistic regression); the map
equals a slow per-row formula for each phi and is monotone in s for every query; on synthetic
retrieval whose per-query relevance cutoffs are drawn from U[0.2, 0.7], the global threshold on
mapped scores is at least 10 points more precise than the best global cosine cutoff at the same
recall; bad input is refused by name."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import sdk
from plugins.calibration.cosine_adapter import cosine_map


def retrieval(queries, docs, seed, dim=8):
    """Per query a relevance cutoff ``c ~ U[0.2, 0.7]`` on the cosine, encoded (non-linearly,
    rotated, with noise) in the query embedding; cosines ``s = 1.2 u^2 - 0.2``; a pair is
    relevant with probability ``sigmoid((s - c) / 0.02)``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(queries, generator=g, dtype=torch.float64) * 0.5 + 0.2
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99),
                                      dtype=torch.float64))[0]
    q = torch.cat([torch.stack([torch.cos(math.pi * c), torch.sin(math.pi * c)], 1),
                   0.3 * torch.randn(queries, dim - 2, generator=g, dtype=torch.float64)], 1) @ rot
    s = torch.rand(queries, docs, generator=g, dtype=torch.float64).pow(2) * 1.2 - 0.2
    rel = torch.rand(queries, docs, generator=g, dtype=torch.float64) < torch.sigmoid((s - c[:, None]) / 0.02)
    pairs = torch.cat([s.reshape(-1, 1), q[:, None, :].expand(queries, docs, dim).reshape(-1, dim)], 1)
    return pairs, rel.reshape(-1).long()


def precision_at_recall(score, relevant, recall):
    """Precision of the smallest top set (a global cutoff on ``score``) reaching ``recall``."""
    hits = relevant[score.argsort(descending=True)].double().cumsum(0)
    k = int((hits >= recall * hits[-1] - 1e-9).nonzero()[0]) + 1
    return float(hits[k - 1] / k)


def test_a_constant_query_is_platt_scaling():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(600, generator=g, dtype=torch.float64) * 2 - 1
    y = (torch.rand(600, generator=g, dtype=torch.float64) < torch.sigmoid(4 * s - 1)).long()
    q = torch.randn(1, 5, generator=g, dtype=torch.float64).expand(600, 5)
    m = sdk.create("calibrator", "cosine_adapter").fit(torch.cat([s[:, None], q], 1), y)
    platt = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(s[:, None].numpy(), y.numpy())
    expected = torch.tensor(platt.predict_proba(s[:, None].numpy())[:, 1])
    torch.testing.assert_close(m(torch.cat([s[:, None], q], 1))[:, 0], expected, atol=2e-4, rtol=0)


def slow_map(s, params, mapping):
    out = []
    for si, p in zip(s.tolist(), params.tolist()):
        a = math.log1p(math.exp(p[0]))
        phi = {"linear": si, "sqrt": math.sqrt((si + 1) / 2),
               "power": ((si + 1) / 2) ** math.log1p(math.exp(p[2])) if len(p) > 2 else None}[mapping]
        out.append(1 / (1 + math.exp(-(a * phi + p[1]))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mapping", ["linear", "sqrt", "power"])
def test_the_map_equals_a_slow_formula_and_is_monotone_for_every_query(mapping):
    g = torch.Generator().manual_seed(1)
    width = 3 if mapping == "power" else 2
    s = torch.rand(50, generator=g, dtype=torch.float64) * 2 - 1
    params = 3 * torch.randn(50, width, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cosine_map(s, params, mapping), slow_map(s, params, mapping))
    pairs, rel = retrieval(40, 20, 2)
    cal = sdk.create("calibrator", "cosine_adapter", mapping=mapping, max_iter=50).fit(pairs, rel)
    grid = torch.linspace(-1, 1, 101, dtype=torch.float64)
    queries = torch.randn(30, 8, generator=g, dtype=torch.float64)
    rows = torch.cat([grid.repeat(30)[:, None], queries.repeat_interleave(101, 0)], 1)
    m = cal(rows)[:, 0].view(30, 101)
    assert bool((m.diff(dim=1) >= 0).all())
    assert float((m[:, -1] - m[:, 0]).min()) > 0


def test_a_global_threshold_on_mapped_scores_beats_every_global_cosine_cutoff():
    cal = sdk.create("calibrator", "cosine_adapter")
    assert (cal.mapping, cal.threshold) == ("linear", 0.5)
    pairs, rel = retrieval(150, 30, 0)
    test, rel_test = retrieval(200, 40, 1)
    m = cal.fit(pairs, rel)(test)[:, 0]
    assert precision_at_recall(m, rel_test, 0.9) >= precision_at_recall(test[:, 0], rel_test, 0.9) + 0.10
    keep = cal.predict(test)  # the paper's filter: the global threshold t = 0.5
    recall = float((keep & (rel_test == 1)).sum() / rel_test.sum())
    precision = float((keep & (rel_test == 1)).sum() / keep.sum())
    assert recall > 0.9
    assert precision >= precision_at_recall(test[:, 0], rel_test, recall) + 0.10


def test_bad_input_is_refused_by_name():
    pairs, rel = retrieval(10, 10, 3)
    cal = sdk.create("calibrator", "cosine_adapter", max_iter=5)
    with pytest.raises(sdk.ShapeError, match="cosine_adapter.*cosines in"):
        cal.fit(pairs * 3, rel)
    with pytest.raises(sdk.ShapeError, match="cosine_adapter.*binary relevance"):
        cal.fit(pairs, rel + 1)
    with pytest.raises(sdk.ShapeError, match="cosine_adapter.*query embedding"):
        cal.fit(pairs[:, :1], rel)
    with pytest.raises(sdk.NotFittedError, match="cosine_adapter"):
        cal(pairs)
    cal.fit(pairs, rel)
    with pytest.raises(sdk.ShapeError, match="cosine_adapter.*fitted on 8"):
        cal(pairs[:, :5])
    with pytest.raises(sdk.ConfigError, match="mapping"):
        sdk.create("calibrator", "cosine_adapter", mapping="cubic")
