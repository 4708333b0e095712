"""The detectors against pytorch-ood (``pip install --no-deps pytorch-ood``) on identical inputs:
skipped when it is not installed. pytorch-ood's package ``__init__`` imports torchvision for its
model zoo, which the detectors do not need: the package is entered without running it."""

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

import sdk


@pytest.fixture(scope="module")
def ood():
    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None:
        pytest.skip("pytorch-ood is not installed")
    if "pytorch_ood" not in sys.modules:
        package = types.ModuleType("pytorch_ood")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["pytorch_ood"] = package
    try:
        from pytorch_ood import detector
    except ImportError as exc:
        pytest.skip(f"pytorch_ood.detector cannot be imported: {exc}")
    return detector


def _data(seed=0, n=120, d=8, c=4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    means = 3 * torch.randn(c, d, generator=g)
    x = means[labels] + torch.randn(n, d, generator=g)
    test = torch.cat([means[torch.arange(20) % c] + torch.randn(20, d, generator=g),
                      3 * torch.randn(20, d, generator=g)])
    return x, labels, test


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_logit_scores_equal_pytorch_ood(ood, temperature):
    z = 3 * torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    pairs = [("energy", {"temperature": temperature}, ood.EnergyBased.score(z, t=temperature)),
             ("msp", {}, ood.MaxSoftmax.score(z)),  # ours has T = 1 only
             ("max_logit", {}, ood.MaxLogit.score(z))]
    for name, params, theirs in pairs:
        ours = sdk.create("detector", name, **params).score(z)
        assert torch.allclose(ours, theirs, atol=1e-6), name


def test_knn_equals_pytorch_ood(ood):
    x, labels, test = _data()
    theirs = ood.KNN(None, k=7).fit_features(x, labels).predict_features(test)
    ours = sdk.create("detector", "knn_ood", k=7).fit(x).score(test)
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_mahalanobis_equals_pytorch_ood_up_to_its_scale(ood):
    """pytorch-ood inverts the within-class scatter W (not W / N, plus a 1e-6 ridge) and scores
    0.5 min_c d_c (the Gaussian log-density term); ours is min_c d_c under (W / N)^-1: 2 N times
    theirs, the same ranking."""
    x, labels, test = _data(2)
    theirs = ood.Mahalanobis(None).fit_features(x, labels).predict_features(test)
    ours = sdk.create("detector", "mahalanobis").fit(x, labels).score(test)
    assert torch.allclose(ours.double(), 2 * len(x) * theirs.double(), rtol=1e-3)  # theirs in float32


def test_vim_equals_pytorch_ood(ood):
    x, labels, test = _data(3, d=12)
    torch.manual_seed(0)
    head = nn.Linear(12, 4)
    theirs = ood.ViM(None, d=5, w=head.weight.detach(), b=head.bias.detach()).fit_features(x, labels)
    ours = sdk.create("detector", "vim", head=head, principal_dim=5).fit(x)
    assert torch.allclose(ours.score(test).double(), theirs.predict_features(test).double(), rtol=1e-4, atol=1e-4)


def test_odin_equals_pytorch_ood(ood):
    x, _, test = _data(4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    theirs = ood.ODIN(model, eps=0.0014, temperature=1000.0).predict(test)
    ours = sdk.create("detector", "odin", model=model).score(test)
    assert torch.allclose(ours, theirs, atol=1e-6)
