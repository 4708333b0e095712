"""Contrastive objectives against independent peer libraries on identical inputs.

lightly (NTXentLoss, DCLLoss, DCLWLoss) and pytorch-metric-learning (NTXentLoss) are optional:
these tests skip when they are not installed (``pip install --no-deps lightly
pytorch-metric-learning tqdm``). Conventions are matched by parameters: lightly's NTXentLoss
defaults to temperature 0.5 and uses a memory bank only when ``memory_bank_size > 0``; PML's
NTXentLoss defaults to temperature 0.07 and takes one embedding matrix with labels marking which
rows form positive pairs; both normalise the embeddings, as our objectives do.
"""

import sys
from pathlib import Path

import pytest
import torch

from plugins.contrastive.decoupled_contrastive import decoupled_contrastive_loss
from plugins.contrastive.nt_xent import nt_xent_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench package is not installed
from bench import peers  # noqa: E402


def _pair(b=32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, requires_grad=True),
            torch.randn(b, d, generator=g, requires_grad=True))


def _lightly():
    pytest.importorskip("lightly")
    losses = peers.lightly_losses()
    if losses is None:
        pytest.skip("lightly.loss cannot be imported")
    return losses


def _assert_same(ours, theirs, inputs):
    """Equal values and equal gradients with respect to every input."""
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_equals_lightly(t):
    lightly = _lightly()
    z1, z2 = _pair(seed=1)
    theirs = lightly.NTXentLoss(temperature=t, memory_bank_size=0)(z1, z2)
    _assert_same(nt_xent_loss(z1, z2, temperature=t), theirs, (z1, z2))


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_nt_xent_equals_pytorch_metric_learning(t):
    pytest.importorskip("pytorch_metric_learning")
    pml = peers.pml_losses()
    z1, z2 = _pair(seed=2)
    labels = torch.arange(z1.shape[0]).repeat(2)  # row i of each view is a positive pair
    theirs = pml.NTXentLoss(temperature=t)(torch.cat([z1, z2]), labels)
    _assert_same(nt_xent_loss(z1, z2, temperature=t), theirs, (z1, z2))


@pytest.mark.parametrize("t", [0.1, 0.3])
def test_decoupled_contrastive_equals_lightly_dcl(t):
    lightly = _lightly()
    z1, z2 = _pair(seed=3)
    _assert_same(decoupled_contrastive_loss(z1, z2, temperature=t),
                 lightly.DCLLoss(temperature=t)(z1, z2), (z1, z2))


@pytest.mark.filterwarnings("ignore::UserWarning")  # lightly copies its weights with torch.tensor()
@pytest.mark.parametrize("t,sigma", [(0.1, 0.5), (0.2, 0.25)])
def test_decoupled_contrastive_equals_lightly_dclw(t, sigma):
    lightly = _lightly()
    z1, z2 = _pair(seed=4)
    _assert_same(decoupled_contrastive_loss(z1, z2, temperature=t, sigma=sigma),
                 lightly.DCLWLoss(temperature=t, sigma=sigma)(z1, z2), (z1, z2))
