"""multilabel_cluster_discrimination (MLCD) against a loop of its loss and its label state."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.multilabel_cluster_discrimination import multilabel_cluster_loss, sample_classes
from sdk.events import State


def slow_mlcd(cos, positives, s, m, keep=None):
    out = []
    for b in range(cos.shape[0]):
        pos = set(positives[b].tolist())
        neg = [j for j in range(cos.shape[1]) if j not in pos and (keep is None or keep[j])]
        lp = math.log(1 + sum(math.exp(-s * (float(cos[b, i]) - m)) for i in pos))
        ln = math.log(1 + sum(math.exp(s * (float(cos[b, j]) + m)) for j in neg))
        out.append(lp + ln)
    return out


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_matches_loop_value_and_gradient(margin):
    g = torch.Generator().manual_seed(0)
    cos = (torch.rand(5, 7, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    pos = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(5)])
    keep = torch.tensor([True, False, True, True, False, True, True])
    got = multilabel_cluster_loss(cos, pos, scale=4.0, margin=margin, class_mask=keep)
    assert got.tolist() == pytest.approx(slow_mlcd(cos.detach(), pos, 4.0, margin, keep), rel=1e-5)
    torch.autograd.gradcheck(lambda c: multilabel_cluster_loss(c, pos, scale=4.0, margin=margin,
                                                               class_mask=keep).double(),
                             (cos,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_zero_is_the_shared_decision_threshold():
    cos = torch.full((2, 6), -0.5)
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]])
    cos.scatter_(1, pos, 0.5)
    assert multilabel_cluster_loss(cos, pos).max() < 1e-6  # positives > 0 > negatives: solved
    wrong = -cos
    assert multilabel_cluster_loss(wrong, pos).min() > 10
    # single-label softmax CE on the same cosines still has loss: no absolute threshold
    assert F.cross_entropy(32 * cos, pos[:, 0]).item() > 0.5


def test_class_sampling_keeps_positives_and_the_ratio():
    torch.manual_seed(0)
    pos = torch.tensor([[1, 5], [5, 9]])
    keep = sample_classes(pos, 40, 0.25)
    assert keep[[1, 5, 9]].all() and int(keep.sum()) == 10
    assert int(sample_classes(pos, 40, 0.01).sum()) == 3  # never drops a positive class
    assert sample_classes(pos, 40, 1.0).all()
    counts = torch.stack([sample_classes(pos, 40, 0.25) for _ in range(200)]).float().mean(0)
    assert counts[[0, 2, 3, 20, 39]].min() > 0.05  # other classes drawn at random


def test_objective_uses_stored_assignments_and_round_trips():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(30, 4, generator=g)
    index = torch.arange(100, 130)
    obj = sdk.create("objective", "multilabel_cluster_discrimination", n_clusters=5, num_positives=2,
                     negative_ratio=1.0, scale=8.0)
    obj.cluster(emb, index)
    centres = F.normalize(obj.centres.detach(), dim=1)
    expected_pos = (F.normalize(emb, dim=1) @ centres.T).topk(2, dim=1).indices
    assert torch.equal(obj.assignments[index], expected_pos)
    z = torch.randn(6, 4, generator=g)
    batch = sdk.Batch(index=index[[0, 3, 5, 7, 11, 29]])
    loss = obj(sdk.Views(embeddings=(z,)), batch)
    cos = F.normalize(z, dim=1) @ centres.T
    expected = slow_mlcd(cos, expected_pos[[0, 3, 5, 7, 11, 29]], 8.0, 0.0)
    assert loss.per_sample.tolist() == pytest.approx(expected, rel=1e-5)
    fresh = sdk.create("objective", "multilabel_cluster_discrimination", n_clusters=5, num_positives=2,
                       negative_ratio=1.0, scale=8.0)
    fresh.load_state_dict(obj.state_dict())
    assert torch.equal(fresh.assignments, obj.assignments) and bool(fresh.initialised)
    assert torch.allclose(fresh(sdk.Views(embeddings=(z,)), batch).value, loss.value)


def test_fit_start_clusters_the_training_set_once_and_recluster_refreshes():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(20, 3, generator=g)
    calls = []

    def embed(loader):
        calls.append(1)
        return emb

    trainer = SimpleNamespace(embed=embed, train_loader=SimpleNamespace(dataset=list(range(20))))
    obj = sdk.create("objective", "multilabel_cluster_discrimination", n_clusters=4, num_positives=2)
    obj.on_fit_start(State(trainer=trainer))
    obj.on_fit_start(State(trainer=trainer))  # resumed: already initialised
    obj.on_epoch_end(State(trainer=trainer))  # recluster=False
    assert len(calls) == 1 and obj.assignments.shape == (20, 2)
    again = sdk.create("objective", "multilabel_cluster_discrimination", n_clusters=4, num_positives=2,
                       recluster=True)
    again.on_epoch_end(State(trainer=trainer))
    assert len(calls) == 2 and bool(again.initialised)


def test_bad_parameters():
    for param, value in [("n_clusters", 1), ("num_positives", 0), ("scale", 0.0), ("margin", -0.1),
                         ("negative_ratio", 0.0), ("embedding_dim", 0)]:
        with pytest.raises(sdk.ConfigError, match=param):
            sdk.create("objective", "multilabel_cluster_discrimination", **{param: value})
    with pytest.raises(sdk.RequirementError, match="view"):
        sdk.create("objective", "multilabel_cluster_discrimination")(sdk.Views(logits=torch.randn(2, 3)))
