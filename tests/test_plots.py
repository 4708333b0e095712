"""Reliability bins against a slow loop, and PNG output of both plots."""

from __future__ import annotations

import pytest
import torch

from sdk import metrics
from sdk.plots import reliability_bins

PNG = b"\x89PNG\r\n\x1a\n"


def probs_and_labels(n=500, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(n, c, generator=g)).softmax(-1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def test_reliability_bins_match_a_slow_loop_and_ece():
    probs, labels = probs_and_labels()
    probs[0] = torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0])  # confidence exactly on a bin edge (k/n)
    n_bins = 10
    bins = reliability_bins(probs, labels, n_bins)
    conf, pred = probs.max(-1)
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        # right-closed bins (lo, hi]; the tolerance absorbs float32 rounding of edge values
        members = [i for i in range(len(labels)) if lo + 1e-6 < conf[i] <= hi + 1e-6]
        assert bins["count"][k] == len(members)
        if members:
            assert bins["confidence"][k] == pytest.approx(sum(float(conf[i]) for i in members) / len(members), abs=1e-6)
            assert bins["accuracy"][k] == pytest.approx(sum(float(pred[i] == labels[i]) for i in members) / len(members))
    ece = float((bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / len(labels))
    assert ece == pytest.approx(metrics.ece(probs, labels, n_bins=n_bins), abs=1e-6)
    assert bins["count"][5] >= 1  # 0.6 falls into (0.5, 0.6], not (0.6, 0.7]


def test_reliability_diagram_and_training_curves_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from sdk.plots import reliability_diagram, training_curves

    probs, labels = probs_and_labels()
    path = reliability_diagram({"before": (probs, labels), "after": (probs.sqrt(), labels)},
                               tmp_path / "rel.png")
    assert path.read_bytes()[:8] == PNG
    history = [{"kind": "train", "epoch": 0, "step": s, "loss": 1 / s} for s in range(1, 6)]
    history += [{"kind": "epoch", "epoch": e, "step": 5 * e, "loss": 1 / (e + 1), "val/accuracy": 0.5}
                for e in range(3)]
    assert training_curves(history, tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert training_curves([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
