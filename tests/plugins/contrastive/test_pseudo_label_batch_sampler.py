"""G-SimCLR batching (pseudo_label_batch_sampler): every index once per epoch, batches that share a
pseudo-label only as often as the cluster sizes force (exhaustive minimum on tiny cases, the even-spread
bound on larger ones, none when clusters fit), seeded, refreshed from the trainer's embeddings, wired
through the Trainer's DataLoader, split evenly over DDP ranks, and fewer same-class negatives than random
batches on digits."""

import itertools
import random

import pytest
import torch
from sklearn.datasets import load_digits

import sdk
from plugins.contrastive.pseudo_label_batch_sampler import pseudo_label_batches
from sdk.data import IndexedDataset
from sdk.events import State


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


def shared_label_pairs(labels, batches):
    return sum(int((labels[b][:, None] == labels[b][None, :]).sum() - len(b)) // 2 for b in batches)


def fewest_shared_label_pairs(labels, batch_size):
    """Exhaustive minimum over every partition into batches of the loader's sizes (tiny N only)."""
    n = len(labels)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    best = [n * n]

    def search(left, sizes, acc):
        if acc >= best[0]:
            return
        if not sizes:
            best[0] = acc
            return
        for chosen in itertools.combinations(left, sizes[0]):
            rest = [i for i in left if i not in chosen]
            search(rest, sizes[1:], acc + shared_label_pairs(labels, [torch.tensor(chosen)]))

    search(list(range(n)), sizes, 0)
    return best[0]


def even_spread_pairs(sizes, n_batches):
    """A lower bound for any partition into ``n_batches`` batches: each cluster spread evenly."""
    total = 0
    for size in sizes:
        per_batch = [size // n_batches + (j < size % n_batches) for j in range(n_batches)]
        total += sum(c * (c - 1) // 2 for c in per_batch)
    return total


@pytest.mark.parametrize("case", range(30))
def test_uneven_clusters_every_index_once_and_fewest_shared_labels_possible(case):
    rng = random.Random(case)
    n, b = rng.randint(4, 9), rng.randint(2, 4)
    labels = torch.tensor([rng.randrange(rng.randint(1, n)) for _ in range(n)])
    labels = torch.unique(labels, return_inverse=True)[1]
    batches = pseudo_label_batches(labels, b, generator=torch.Generator().manual_seed(case))
    assert sorted(torch.cat(batches).tolist()) == list(range(n))  # every index exactly once
    assert all(len(x) == b for x in batches[:-1]) and 1 <= len(batches[-1]) <= b
    assert shared_label_pairs(labels, batches) == fewest_shared_label_pairs(labels, b)


@pytest.mark.parametrize("labels,b,fewest", [
    ([0, 0, 0, 0, 0, 1], 4, 4),  # the partial batch best takes two of the big cluster
    ([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5], 10, 4),  # 6 clusters fill 10 slots: 4 repeats
    ([0, 0, 1, 1, 2], 3, 0),  # clusters of w + 1 = 2, no more of them than r = 2: no repeat
    ([0, 0, 0, 1, 1, 1, 2], 3, 1),  # two clusters of w + 1 = 3 but r = 1: one repeat
])
def test_known_minima(labels, b, fewest):
    labels = torch.tensor(labels)
    assert fewest_shared_label_pairs(labels, b) == fewest
    for seed in range(5):
        batches = pseudo_label_batches(labels, b, generator=torch.Generator().manual_seed(seed))
        assert sorted(torch.cat(batches).tolist()) == list(range(len(labels)))
        assert shared_label_pairs(labels, batches) == fewest


@pytest.mark.parametrize("seed", range(4))
def test_full_batches_meet_the_even_spread_bound_and_fitting_clusters_never_share(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 60, (40,), generator=g)
    sizes[0] = 240 - int(sizes[1:].sum()) % 8 + 8 * 40  # one dominant cluster, N a multiple of 8
    labels = torch.arange(40).repeat_interleave(sizes)[torch.randperm(int(sizes.sum()), generator=g)]
    batches = pseudo_label_batches(labels, 8, generator=g)
    assert len(labels) % 8 == 0 and sorted(torch.cat(batches).tolist()) == list(range(len(labels)))
    assert shared_label_pairs(labels, batches) == even_spread_pairs(sizes.tolist(), len(batches)) > 0
    # uneven clusters of at most w = floor(N / B) members: no batch repeats a pseudo-label
    n = int(torch.randint(150, 250, (), generator=g))
    w = n // 8
    labels = torch.randperm(n, generator=g) % (n // w + 1)
    assert int(torch.bincount(labels).max()) <= w and int(torch.bincount(labels).min()) < w - 1
    batches = pseudo_label_batches(labels, 8, generator=g)
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    assert shared_label_pairs(labels, batches) == 0


def test_one_oversized_cluster_keeps_every_member():
    g = torch.Generator().manual_seed(4)
    labels = torch.cat([torch.zeros(30, dtype=torch.long), torch.arange(1, 61)])  # one big cluster
    labels = labels[torch.randperm(90, generator=g)]
    batches = pseudo_label_batches(labels, 6, generator=g)
    assert sorted(torch.cat(batches).tolist()) == list(range(90))  # nothing left out, nothing twice
    assert len(batches) == 15 and all(len(x) == 6 for x in batches)
    for x in batches:  # 30 members over 15 batches: exactly two in each, the fewest possible
        assert int((labels[x] == 0).sum()) == 2 and labels[x].unique().numel() == 5


def test_ranks_take_equal_shares_of_whole_batches(monkeypatch):
    from sdk import distributed
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 12, (101,), generator=g)
    sampler = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=101, batch_size=8,
                         n_clusters=12)
    sampler.labels = labels
    every = sampler.batches()  # 12 full batches, then a partial one of 5
    monkeypatch.setattr(distributed, "world_size", lambda: 5)
    shares = []
    for rank in range(5):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(sampler.batches())
        assert len(sampler) == 16
    assert [len(s) for s in shares] == [2] * 5 and all(len(x) == 8 for s in shares for x in s)
    flat = torch.cat([x for s in shares for x in s])
    assert flat.unique().numel() == 80  # disjoint ranks; 2 full batches and the partial one left out
    assert sorted(flat.tolist()) == sorted(torch.cat(every[:10]).tolist())


def test_refresh_from_trainer_embeddings_and_loader_batches():
    data, truth = blobs(12, 9)
    sampler = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=len(data), batch_size=8,
                         n_clusters=12, features=True, seed=3)
    trainer = FakeTrainer(data, 8)
    sampler.set_epoch(0)
    sampler.on_epoch_start(State(trainer=trainer))
    assert trainer.calls == [True]
    same = (sampler.labels[:, None] == sampler.labels[None, :])
    assert torch.equal(same, truth[:, None] == truth[None, :])  # k-means found the blobs
    seen = loaded_batches(sampler, 8)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(data)))
    for x in seen:
        assert truth[x].unique().numel() == len(x)
    with pytest.raises(sdk.ConfigError) as err:
        sampler.on_epoch_start(State(trainer=FakeTrainer(data, 16)))
    assert err.value.param == "batch_size"


def test_deterministic_per_seed_and_epoch_and_state_round_trips():
    data, _ = blobs(10, 10, seed=5)

    def order(seed, epoch):
        s = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=100, batch_size=10,
                       seed=seed)
        s.set_epoch(epoch)
        s.on_epoch_start(State(trainer=FakeTrainer(data, 10)))
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
        def after_forward(self, state):
            seen.append(state.batch.index.cpu())

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


def test_resume_after_a_kill_mid_epoch_replays_the_same_batches(tmp_path):
    runs = sdk.testing.check_resume(  # killed in the second epoch, 2 steps after its checkpoint
        objective=lambda: sdk.create("objective", "nt_xent"),
        sampler=lambda: sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=40, batch_size=8),
        steps=8, kill_at=7, tmp_dir=tmp_path)
    sampler = runs.resumed.data_sampler
    assert sampler.epoch == 1 and sampler.labels.unique().numel() == 8


def test_fewer_same_class_pairs_than_random_batches_on_digits():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    sampler = sdk.create("sampler", "pseudo_label_batch_sampler", num_samples=len(x), batch_size=10,
                         n_clusters=10)  # as many clusters as classes, batches of one per cluster
    sampler.on_epoch_start(State(trainer=FakeTrainer(x, 10)))

    def same_class_pairs_per_sample(batches):
        pairs = sum(int((y[b][:, None] == y[b][None, :]).sum() - len(b)) for b in batches) / 2
        return pairs / sum(len(b) for b in batches)

    batches = sampler.batches()
    assert sorted(torch.cat(batches).tolist()) == list(range(len(x)))  # all 1797, none left out
    sizes = torch.bincount(sampler.labels).tolist()
    assert max(sizes) > len(batches)  # uneven clusters: some pseudo-labels must repeat ...
    assert shared_label_pairs(sampler.labels, batches) == even_spread_pairs(sizes, len(batches))  # ... fewest
    guided = same_class_pairs_per_sample(batches)
    shuffled = same_class_pairs_per_sample(torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
                                           .split(10))
    assert guided < 0.6 * shuffled  # measured 0.220 vs 0.441 same-class pairs per sample


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
