"""The unlabelled loader of Trainer.fit: what objectives receive (mu B rows per step, indices
covering the unlabelled set once per unlabelled epoch, drawn on its own), the general loop, the
checks at fit start, each rank its own shard."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sdk
from sdk import keys
from sdk.data import GaussianNoise
from sdk.engine import ResumableSampler, UnlabeledStream
from sdk.errors import ConfigError, RequirementError
from sdk.interfaces import Objective
from sdk.types import Loss


class Recording(Objective):
    """Cross-entropy that records the unlabelled rows it is given."""

    requires = {"logits": True, "targets": True, "unlabeled": True}
    batch_coupled = False

    def __init__(self):
        super().__init__()
        self.seen, self.shapes = [], []

    def forward(self, views, batch):
        u = views.extras.get(keys.UNLABELED)
        if u is not None:
            self.seen.append(views.extras[keys.UNLABELED_INDEX].clone())
            self.shapes.append([tuple(z.shape) for z in u])
            value = torch.nn.functional.cross_entropy(views.logits, batch.targets) + 0 * u[1].sum()
        else:
            value = torch.nn.functional.cross_entropy(views.logits, batch.targets)
        return Loss(value=value)


def sets(n_lab=12, n_unl=20):
    lab = TensorDataset(torch.randn(n_lab, 6), torch.arange(n_lab) % 3, torch.arange(n_lab))
    unl = TensorDataset(torch.randn(n_unl, 6), torch.zeros(n_unl, dtype=torch.long),
                        torch.arange(n_unl))
    return lab, unl


def trainer(objective, **kw):
    torch.manual_seed(0)
    model = sdk.create("encoder", "mlp", in_dim=6, out_dim=3, hidden_dims=(8,), batch_norm=False)
    return sdk.Trainer(model, objective, unlabeled_transforms=(GaussianNoise(0.1), GaussianNoise(0.5)),
                       progress=False, device="cpu", **kw)


def test_each_step_gets_mu_b_unlabelled_rows_each_sample_once_per_unlabelled_epoch():
    lab, unl = sets()
    obj = Recording()
    t = trainer(obj, max_steps=10)
    t.fit(DataLoader(lab, batch_size=4, shuffle=True),
          unlabeled=DataLoader(unl, batch_size=8, shuffle=True, drop_last=True))
    assert not t._plain_loop  # a semi-supervised run takes the general loop
    assert obj.shapes == [[(8, 3), (8, 3)]] * 10  # mu = 2: weak and strong views of 8 rows
    epochs = [torch.cat(obj.seen[i:i + 2]) for i in range(0, 10, 2)]  # 2 batches per epoch
    for e in epochs:
        assert len(set(e.tolist())) == 16  # no sample twice within an unlabelled epoch
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled
    assert t._unlabeled.position == (4, 2)  # epoch 4, its two batches drawn
    t.evaluate(DataLoader(lab, batch_size=4))  # evaluation: no unlabelled views, no draw
    assert len(obj.seen) == 10


def test_fit_checks_who_reads_the_unlabelled_data():
    lab, unl = sets()
    with pytest.raises(RequirementError, match="unlabeled=loader"):
        trainer(Recording(), max_steps=1).fit(DataLoader(lab, batch_size=4))
    with pytest.raises(ConfigError, match="neither objective 'cross_entropy' nor a callback"):
        trainer(sdk.create("objective", "cross_entropy"), max_steps=1).fit(
            DataLoader(lab, batch_size=4), unlabeled=DataLoader(unl, batch_size=8))
    with pytest.raises(ConfigError, match="yields no batch"):
        trainer(Recording(), max_steps=1).fit(
            DataLoader(lab, batch_size=4), unlabeled=DataLoader(unl, batch_size=32, drop_last=True))


def test_a_later_fit_continues_the_unlabelled_stream():
    lab, unl = sets()
    obj = Recording()
    t = trainer(obj, max_steps=3)
    loaders = (DataLoader(lab, batch_size=4, shuffle=True),
               DataLoader(unl, batch_size=8, shuffle=True, drop_last=True))
    t.fit(loaders[0], unlabeled=loaders[1])
    t.max_steps = t.total_steps = 6  # the same trainer, three more steps
    t.fit(loaders[0], unlabeled=loaders[1])
    straight = Recording()
    trainer(straight, max_steps=6).fit(*loaders[:1], unlabeled=loaders[1])
    assert all(torch.equal(a, b) for a, b in zip(obj.seen, straight.seen))


def test_each_rank_draws_its_own_shard():
    _, unl = sets(n_unl=20)
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(20, shuffle=True, seed=5, rank=rank, world=2)
        loader = DataLoader(unl, batch_size=5, sampler=sampler, generator=torch.Generator())
        stream = UnlabeledStream(loader, sampler, seed=5)
        seen.append(torch.cat([stream.next()[2] for _ in range(2)]))
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert sorted(seen[0].tolist() + seen[1].tolist()) == list(range(20))
