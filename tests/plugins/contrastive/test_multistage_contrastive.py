"""Multistage contrastive learning (multistage_contrastive): stages close at the given epochs,
the stage-s negatives equal a slow construction from earlier clusters, K = 1 reduces to plain
InfoNCE, and stage and clusters are checkpointed through the Trainer."""

import pytest
import torch

import sdk
from plugins.contrastive.multistage_contrastive import stage_negatives
from sdk.data import IndexedDataset
from sdk.events import State


class FakeTrainer:
    def __init__(self, x, index=None):
        ds = IndexedDataset(x, torch.zeros(len(x)), index)
        self.train_loader = torch.utils.data.DataLoader(ds, batch_size=4)
        self.epoch, self.embeds = 0, 0

    def embed(self, loader, features=False):
        self.embeds += 1
        return loader.dataset.x * (1 + self.embeds)  # changes as training goes on


def blobs(seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(4).repeat(6)
    return 10 * torch.randn(4, 5, generator=g)[truth] + 0.1 * torch.randn(24, 5, generator=g), truth


def test_stages_close_at_their_epochs_once():
    x, _ = blobs()
    sampler = sdk.create("sampler", "multistage_contrastive", stage_epochs=(2, 4), n_clusters=4)
    trainer = FakeTrainer(x)
    stages = []
    for epoch in range(6):
        trainer.epoch = epoch
        sampler.on_epoch_start(State(trainer=trainer, epoch=trainer.epoch))
        stages.append(int(sampler.stage))
    assert stages == [0, 0, 1, 1, 2, 2]
    assert trainer.embeds == 2 and sampler.labels.shape == (2, 24)
    late = sdk.create("sampler", "multistage_contrastive", stage_epochs=(2, 4), n_clusters=4)
    trainer.epoch = 5  # resumed past both boundaries without their clusters: both close now
    late.on_epoch_start(State(trainer=trainer, epoch=trainer.epoch))
    assert int(late.stage) == 2


def test_negatives_match_a_slow_construction():
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([torch.randint(0, 3, (30,), generator=g), torch.randint(0, 2, (30,), generator=g)])
    idx = torch.randperm(30, generator=g)[:7]
    got = stage_negatives(labels[:, idx])
    slow = [[i != j and all(int(labels[r, idx[i]]) == int(labels[r, idx[j]]) for r in range(2))
             for j in range(7)] for i in range(7)]
    assert got.tolist() == slow
    sampler = sdk.create("sampler", "multistage_contrastive", stage_epochs=(1, 2))
    sampler.load_state_dict({"stage": torch.tensor(2), "labels": labels})
    views = sdk.Views(embeddings=(torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)))
    pairs = sampler.pairs(views, sdk.Batch(index=idx))
    rows = torch.arange(7).repeat(2)
    assert torch.equal(pairs.negative, got[rows][:, rows])
    assert torch.equal(pairs.positive, (rows[:, None] == rows[None, :]))


def test_one_cluster_reduces_to_plain_infonce_and_clusters_restrict_it():
    x, truth = blobs(2)
    g = torch.Generator().manual_seed(3)
    views = sdk.Views(embeddings=(torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g)))
    batch = sdk.Batch(index=torch.arange(24))
    plain = sdk.create("objective", "nt_xent", temperature=0.1)(views, batch).value
    trainer = FakeTrainer(x)
    trainer.epoch = 1
    one = sdk.create("sampler", "multistage_contrastive", stage_epochs=(1,), n_clusters=1)
    one.on_epoch_start(State(trainer=trainer, epoch=trainer.epoch))
    staged = sdk.create("objective", "nt_xent", temperature=0.1, sampler=one)(views, batch).value
    assert torch.allclose(staged, plain, atol=1e-6)
    four = sdk.create("sampler", "multistage_contrastive", stage_epochs=(1,), n_clusters=4)
    four.on_epoch_start(State(trainer=trainer, epoch=trainer.epoch))
    got = four.labels[0]
    assert torch.equal(got[:, None] == got[None, :], truth[:, None] == truth[None, :])
    pairs = four.pairs(views, batch)
    t = truth.repeat(2)
    assert not bool((pairs.negative & (t[:, None] != t[None, :])).any())  # only same-blob negatives
    restricted = sdk.create("objective", "nt_xent", temperature=0.1, sampler=four)(views, batch).value
    assert float(restricted) < float(plain)


def test_trainer_runs_stages_and_checkpoints_them(tmp_path):
    x, truth = blobs(4)
    ds = IndexedDataset(x, truth)

    def jitter(z, b):
        return z + 0.01 * torch.randn_like(z), b
    def make():
        sampler = sdk.create("sampler", "multistage_contrastive", stage_epochs=(1,), n_clusters=4)
        obj = sdk.create("objective", "nt_xent", temperature=0.1)
        return sampler, sdk.Trainer(torch.nn.Linear(5, 8), obj, sampler=sampler, transforms=jitter,
                                    max_epochs=2, progress=False, device="cpu", run_dir=tmp_path)

    sampler, trainer = make()
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    trainer.fit(loader)
    assert int(sampler.stage) == 1 and sampler.labels.shape == (1, 24)
    state = trainer.state_dict()["components"]["sampler"]
    assert torch.equal(state["labels"], sampler.labels)
    again, resumed = make()
    resumed.fit(loader, resume=True)  # both epochs done: only the checkpoint is loaded
    assert int(again.stage) == 1 and torch.equal(again.labels, sampler.labels)


def test_resume_after_a_kill_in_the_second_stage_restores_stage_and_clusters(tmp_path):
    runs = sdk.testing.check_resume(  # 5 steps per epoch: stage 1 starts at step 5, killed at 7
        objective=lambda: sdk.create("objective", "nt_xent", temperature=0.1),
        sampler=lambda: sdk.create("sampler", "multistage_contrastive", stage_epochs=(1,), n_clusters=4),
        steps=8, kill_at=7, tmp_dir=tmp_path)
    assert int(runs.resumed.pair_sampler.stage) == 1 and runs.resumed.pair_sampler.labels.shape == (1, 40)


def test_bad_parameters_are_named():
    for field, value in (("stage_epochs", ()), ("stage_epochs", (3, 2)), ("stage_epochs", (0,)),
                         ("n_clusters", 0), ("kmeans_iters", 0)):
        with pytest.raises(sdk.ConfigError) as err:
            sdk.create("sampler", "multistage_contrastive", **{field: value})
        assert err.value.param == field
    sampler = sdk.create("sampler", "multistage_contrastive", stage_epochs=(1,), n_clusters=50)
    with pytest.raises(sdk.ConfigError, match="n_clusters"):
        sampler.finish_stage(torch.randn(10, 2), torch.arange(10))
    sampler.load_state_dict({"stage": torch.tensor(1), "labels": torch.zeros(1, 5, dtype=torch.long)})
    with pytest.raises(sdk.RequirementError, match="Batch.index"):
        sampler.pairs(sdk.Views(embeddings=(torch.randn(3, 2), torch.randn(3, 2))), sdk.Batch())
