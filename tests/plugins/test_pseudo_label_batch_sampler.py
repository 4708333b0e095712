"""G-SimCLR batching (pseudo_label_batch_sampler): no batch holds two samples of one pseudo-label,
every index once per epoch, seeded, refreshed from the trainer's embeddings, wired through the
Trainer's DataLoader, and fewer same-class negatives than random batches on digits."""

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.pseudo_label_batch_sampler import pseudo_label_batches
from sdk.data import IndexedDataset


def blobs(n_clusters, per, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(n_clusters, d, generator=g)
    truth = torch.arange(n_clusters).repeat_interleave(per)
    return centres[truth] + 0.1 * torch.randn(len(truth), d, generator=g), truth


class FakeTrainer:
    def __init__(self, data, batch_size):
        self.data = data
        self.train_loader = torch.utils.data.DataLoader(torch.arange(len(data)), batch_size=batch_size)
        self.calls = []

    def embed(self, loader, features=False):
        self.calls.append(features)
        return self.data


def loaded_batches(sampler, batch_size):
    """What a DataLoader built the way the Trainer builds it yields."""
    loader = torch.utils.data.DataLoader(torch.arange(sampler.num_samples), batch_size=batch_size,
                                         sampler=sampler)
    return [b for b in loader]


@pytest.mark.parametrize("n,b,k,seed", [(100, 8, 12, 0), (97, 10, 10, 1), (64, 16, 16, 2),
                                        (50, 7, 50, 3)])
def test_balanced_clusters_every_index_once_and_no_shared_label(n, b, k, seed):
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % k  # sizes differ by <= 1
    batches = pseudo_label_batches(labels, b, generator=torch.Generator().manual_seed(seed))
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(n))  # every index exactly once
    assert all(len(x) == b for x in batches[:-1]) and 1 <= len(batches[-1]) <= b
    for x in batches:
        assert labels[x].unique().numel() == len(x)


def test_oversized_clusters_leave_out_only_their_surplus():
    g = torch.Generator().manual_seed(4)
    labels = torch.cat([torch.zeros(30, dtype=torch.long), torch.arange(1, 61)])  # one big cluster
    labels = labels[torch.randperm(90, generator=g)]
    batches = pseudo_label_batches(labels, 6, generator=g)
    flat = torch.cat(batches)
    assert flat.unique().numel() == flat.numel()  # nothing twice
    assert (labels[flat] != 0).sum() == 60  # every singleton cluster kept
    assert (labels[flat] == 0).sum() == len(batches)  # the big one: one per batch, no more
    for x in batches:
        assert labels[x].unique().numel() == len(x)
    assert all(len(x) == 6 for x in batches[:-1])


def test_refresh_from_trainer_embeddings_and_loader_batches():
    data, truth = blobs(12, 9)
    sampler = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=len(data), batch_size=8,
                         n_clusters=12, features=True, seed=3)
    trainer = FakeTrainer(data, 8)
    sampler.set_epoch(0)
    sampler.on_epoch_start(trainer)
    assert trainer.calls == [True]
    same = (sampler.labels[:, None] == sampler.labels[None, :])
    assert torch.equal(same, truth[:, None] == truth[None, :])  # k-means found the blobs
    seen = loaded_batches(sampler, 8)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(data)))
    for x in seen:
        assert truth[x].unique().numel() == len(x)
    with pytest.raises(sdk.ConfigError) as err:
        sampler.on_epoch_start(FakeTrainer(data, 16))
    assert err.value.param == "batch_size"


def test_deterministic_per_seed_and_epoch_and_state_round_trips():
    data, _ = blobs(10, 10, seed=5)

    def order(seed, epoch):
        s = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=100, batch_size=10,
                       seed=seed)
        s.set_epoch(epoch)
        s.on_epoch_start(FakeTrainer(data, 10))
        return list(s), s

    a, s = order(0, 0)
    assert a == order(0, 0)[0]
    assert a != order(1, 0)[0] and a != order(0, 1)[0]
    resumed = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=100, batch_size=10)
    resumed.load_state_dict(s.state_dict())  # a resumed epoch replays the same order
    assert list(resumed) == a and len(resumed) == 100


def test_trainer_feeds_batches_of_distinct_pseudo_labels():
    data, truth = blobs(8, 6, d=5, seed=6)
    ds = IndexedDataset(data, truth)
    seen = []

    class Record(sdk.interfaces.Callback):
        def after_forward(self, trainer):
            seen.append(trainer.batch.index.cpu())

    sampler = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=48, batch_size=8)
    trainer = sdk.Trainer(torch.nn.Linear(5, 8), sdk.create("objective", "cross_entropy"),
                          sampler=sampler, callbacks=[Record()], max_epochs=2, progress=False,
                          device="cpu")
    trainer.fit(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True))
    assert len(seen) == 12
    for epoch in (seen[:6], seen[6:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(48))
        for x in epoch:
            assert truth[x].unique().numel() == len(x)


def test_fewer_same_class_pairs_than_random_batches_on_digits():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    sampler = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=len(x), batch_size=10,
                         n_clusters=10)  # as many clusters as classes, batches of one per cluster
    sampler.on_epoch_start(FakeTrainer(x, 10))

    def same_class_pairs_per_sample(batches):
        pairs = sum(int((y[b][:, None] == y[b][None, :]).sum() - len(b)) for b in batches) / 2
        return pairs / sum(len(b) for b in batches)

    guided = same_class_pairs_per_sample(sampler.batches())
    random = same_class_pairs_per_sample(torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
                                         .split(10))
    assert guided < 0.5 * random


def test_bad_parameters_are_named():
    for field, params in (("batch_size", dict(batch_size=0)), ("num_samples", dict(num_samples=0)),
                          ("n_clusters", dict(n_clusters=4)), ("kmeans_iters", dict(kmeans_iters=0))):
        kwargs = dict(num_samples=100, batch_size=8) | params
        with pytest.raises(sdk.ConfigError) as err:
            sdk.create("sampler", "pseudo_label_batch_sampler", **kwargs)
        assert err.value.param == field
    s = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=10, batch_size=2)
    with pytest.raises(sdk.ShapeError, match="dataset order"):
        s.refresh(torch.zeros(9, 3))


def test_bind_takes_the_training_set_size():
    s = sdk.create("sampler", "pseudo_label_batch_sampler", batch_size=8)  # num_samples 50000
    s.bind(torch.utils.data.TensorDataset(torch.zeros(40, 3)))
    assert s.num_samples == 40 and len(s) == 40 and sorted(s) == list(range(40))
    with pytest.raises(sdk.ConfigError) as err:
        s.bind(torch.utils.data.TensorDataset(torch.zeros(5, 3)))
    assert err.value.param == "n_clusters" and s.num_samples == 40
