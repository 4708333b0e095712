"""label_agnostic_forgetting: the reconstruction energy, the two unlearning losses and the VAE loss
equal slow loops and their analytic values; with the authors' defaults and no labels, unlearning
class 0 of digits from a trained MLP drops that class's training accuracy while the remaining
classes keep theirs within 2 points; the callback unlearns the rows named by Batch.index when the
fit ends."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader

import sdk
from plugins.training.label_agnostic_forgetting import (
    alignment_loss,
    extractor_loss,
    reconstruction_energy,
    unlearn,
    vae_loss,
)
from sdk.data import IndexedDataset

NAME = "label_agnostic_forgetting"


def test_losses_equal_slow_loops_and_analytic_values():
    g = torch.Generator().manual_seed(0)
    o, e = torch.randn(5, 4, generator=g).double(), torch.randn(5, 4, generator=g).double()
    slow = sum(math.exp(m / (m + 1)) for m in (sum((o[i, d] - e[i, d]).item() ** 2 for d in range(4))
                                               for i in range(5)))
    assert reconstruction_energy(o, e).item() == pytest.approx(slow, rel=1e-12)
    assert reconstruction_energy(e, e).item() == pytest.approx(5.0)  # perfect reconstruction: B
    fo, fe = torch.randn(3, 4, generator=g).double(), torch.randn(3, 4, generator=g).double()
    assert extractor_loss(o, e, fo, fe).item() == pytest.approx(
        slow - reconstruction_energy(fo, fe).item(), rel=1e-12)

    r, rt = torch.randn(4, 6, generator=g).double(), torch.randn(4, 6, generator=g).double()
    f, ft = torch.randn(3, 6, generator=g).double(), torch.randn(3, 6, generator=g).double()

    def d(a, b):
        return 1 - float(a @ b) / (float(a.norm()) * float(b.norm()))

    denom = math.log(sum(math.exp(d(f[j], ft[j]) / 5.0) for j in range(3)))
    want = sum(d(r[i], rt[i]) - denom for i in range(4))
    assert alignment_loss(r, rt, f, ft).item() == pytest.approx(want, rel=1e-10)  # T = 5 default
    assert alignment_loss(r, r, f, f, 2.0).item() == pytest.approx(-4 * math.log(3))  # all aligned

    mu, sigma = torch.randn(5, 2, generator=g).double(), torch.rand(5, 2, generator=g).double() + 0.5
    kl = sum(-0.5 * (math.log(s ** 2 + 1e-8) + 1 - m ** 2 - s ** 2)
             for m, s in zip(mu.flatten().tolist(), sigma.flatten().tolist()))
    sq = float(((o - e) ** 2).sum())
    assert vae_loss(o, e, mu, sigma).item() == pytest.approx((sq + 0.025 * kl) / 5, rel=1e-10)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def test_unlearning_digit_zero_without_labels_forgets_it_and_keeps_the_rest():
    x, y = load_digits(return_X_y=True)
    xtr, _, ytr, _ = train_test_split(x / 16, y, test_size=0.3, random_state=0, stratify=y)
    xtr, ytr = torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    forget, remain = ytr == 0, ytr != 0

    def stats():
        with torch.no_grad():
            out = net(xtr)
            right = out.argmax(1) == ytr
            ce = F.cross_entropy(out, ytr, reduction="none")
        return right[forget].float().mean(), right[remain].float().mean(), ce[forget].mean(), ce[remain].mean()

    before = stats()
    unlearn(net, net.features, xtr[forget], xtr[remain])  # the labels are never passed
    after = stats()
    # measured: forget-class accuracy 1.000 -> 0.831, remaining 1.000 -> 0.995; mean CE of the
    # forgotten rows 0.0013 -> 0.418, of the remaining 0.0069 -> 0.024
    assert after[0] < before[0] - 0.1
    assert after[1] > before[1] - 0.02
    assert after[2] - before[2] > 5 * (after[3] - before[3])


def test_the_callback_unlearns_the_rows_named_by_index_at_fit_end():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 6, generator=g), torch.arange(48) % 3
    data = IndexedDataset(x, y, index=torch.arange(100, 148))
    cb = sdk.create("callback", NAME, forget_index=tuple(range(100, 112)), epochs=2, vae_epochs=2,
                    features=False, lr_ue=1e-2, lr_ra=1e-2)
    fx, rx = cb.split(data)
    assert torch.equal(fx, x[:12]) and torch.equal(rx, x[12:])
    runs = []
    for callbacks in ([], [cb], [sdk.create("callback", NAME, features=False)]):
        torch.manual_seed(0)
        trainer = sdk.Trainer(encoder=nn.Linear(6, 3), objective=sdk.create("objective", "cross_entropy"),
                              callbacks=callbacks, max_epochs=1, progress=False, seed=0)
        trainer.fit(DataLoader(data, batch_size=8))
        runs.append(trainer.encoder.weight.detach().clone())
    assert not torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])  # the default forgets nothing


def test_defaults_are_the_authors_mnist_settings():
    cb = sdk.create("callback", NAME, forget_index=(0,))
    assert cb.options == dict(latent_dim=8, epochs=20, lr_ue=5e-5, lr_ra=1e-4, temperature=5.0,
                              vae_epochs=10, vae_lr=1e-3, kld_weight=0.025, batch_size=32, seed=0)
    assert cb.features is True and sdk.create("callback", NAME).forget_index == ()


def test_bad_input():
    data = IndexedDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.ConfigError, match="forget_index"):
        sdk.create("callback", NAME, forget_index=(-1,))
    with pytest.raises(sdk.ConfigError, match="temperature"):
        sdk.create("callback", NAME, forget_index=(0,), temperature=0.0)
    with pytest.raises(sdk.ShapeError, match=rf"{NAME}: forget_index holds ids absent"):
        sdk.create("callback", NAME, forget_index=(7,)).split(data)
    with pytest.raises(sdk.ShapeError, match="covers the whole training set"):
        sdk.create("callback", NAME, forget_index=(0, 1, 2, 3)).split(data)
    trainer = sdk.Trainer(encoder=nn.Linear(2, 2), objective=sdk.create("objective", "cross_entropy"),
                          callbacks=[sdk.create("callback", NAME, forget_index=(0,))], max_epochs=1,
                          progress=False)
    with pytest.raises(sdk.RequirementError, match="features=True needs an sdk Encoder"):
        trainer.fit(DataLoader(data, batch_size=2))
