"""Small models and data shared by the engine tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from sdk.data import IndexedDataset


def make_data(n: int = 64, dim: int = 8, classes: int = 3, seed: int = 0) -> IndexedDataset:
    """Linearly separable-ish classes: the class mean plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.randn(classes, dim, generator=g) * 2
    x = means[y] + torch.randn(n, dim, generator=g)
    return IndexedDataset(x, y)


def make_mlp(dim: int = 8, out: int = 3, hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


@pytest.fixture(name="make_data")
def make_data_fixture():
    return make_data


@pytest.fixture(name="make_mlp")
def make_mlp_fixture():
    return make_mlp


@pytest.fixture
def data() -> IndexedDataset:
    return make_data()


@pytest.fixture
def loader(data) -> DataLoader:
    return DataLoader(data, batch_size=16, shuffle=True)
