"""vim against the authors' recipe written with numpy (float64): origin -pinv(W) b,
np.linalg.eig of the covariance of x - u about u, the null space of the smallest
eigenvalues, alpha = mean max logit / mean residual norm."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn

import sdk


def slow_vim(w, b, train, test, dim):
    u = -np.linalg.pinv(w) @ b
    centred = train - u
    vals, vecs = np.linalg.eig(centred.T @ centred / len(train))
    ns = np.ascontiguousarray(vecs[:, np.argsort(vals * -1)[dim:]].real)
    alpha = (train @ w.T + b).max(1).mean() / np.linalg.norm((train - u) @ ns, axis=-1).mean()
    vlogit = np.linalg.norm((test - u) @ ns, axis=-1) * alpha
    return vlogit - logsumexp(test @ w.T + b, axis=-1)


@pytest.mark.parametrize("principal_dim", [None, 3])
def test_vim_equals_the_authors_recipe(principal_dim):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 10, generator=g) @ torch.randn(10, 10, generator=g) + 2
    test = torch.randn(20, 10, generator=g) * 3
    torch.manual_seed(0)
    head = nn.Linear(10, 4)
    det = sdk.create("detector", "vim", head=head, principal_dim=principal_dim)
    for lo in range(0, 300, 70):
        det.update(train[lo:lo + 70])
    det.finalize()
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    expected = slow_vim(w, b, train.double().numpy(), test.double().numpy(), 5 if principal_dim is None else 3)
    assert np.allclose(det.score(test).double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_principal_dim_rule_and_its_bounds():
    from plugins.uncertainty.vim import principal_dim_rule

    assert [principal_dim_rule(w) for w in (2048, 1024, 768, 512, 10)] == [1000, 512, 512, 256, 5]
    with pytest.raises(sdk.ConfigError, match="principal_dim 4 must be below the feature width 4"):
        sdk.create("detector", "vim", principal_dim=4).fit(torch.randn(20, 4))
    with pytest.raises(sdk.ConfigError, match="head takes 3 features"):
        sdk.create("detector", "vim", head=nn.Linear(3, 2)).fit(torch.randn(20, 4))
