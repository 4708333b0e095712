"""Shared fixtures of the OOD-detector and test-time-adaptation tests."""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


@pytest.fixture(scope="session")
def digits():
    """An MLP with BatchNorm trained on 1000 of scikit-learn's digits (10 epochs of Adam), in
    eval mode, and the other 797 digits and labels as the test stream."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1000], perm[1000:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        for idx in torch.randperm(1000, generator=g).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[train][idx]), y[train][idx]).backward()
            opt.step()
    return model.eval(), x[test], y[test]
