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


# non-contrastive objectives (plugins/ssl) against lightly -------------------------------------


def _ssl_views(n_views=2, b=32, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, d, generator=g, requires_grad=True) for _ in range(n_views))


@pytest.mark.parametrize("lambd", [5e-3, 0.05])
def test_barlow_twins_equals_lightly(lambd):
    from plugins.ssl.barlow_twins import barlow_twins_loss

    lightly = _lightly()
    z1, z2 = _ssl_views(seed=10)
    _assert_same(barlow_twins_loss(z1, z2, lambd),
                 lightly.BarlowTwinsLoss(lambda_param=lambd)(z1, z2), (z1, z2))


@pytest.mark.parametrize("params", [{}, {"lambd": 5.0, "mu": 10.0, "nu": 2.0}])
def test_vicreg_equals_lightly(params):
    from plugins.ssl.vicreg import vicreg_loss

    lightly = _lightly()
    z1, z2 = _ssl_views(seed=11)
    names = {"lambd": "lambda_param", "mu": "mu_param", "nu": "nu_param"}
    theirs = lightly.VICRegLoss(**{names[k]: v for k, v in params.items()})(z1, z2)
    _assert_same(vicreg_loss(z1, z2, **params), theirs, (z1, z2))


def test_byol_and_simsiam_equal_lightlys_negative_cosine_similarity():
    from plugins.ssl.byol import byol_loss
    from plugins.ssl.simsiam import simsiam_loss

    lightly = _lightly()
    p1, p2 = _ssl_views(seed=12)
    t1, t2 = (t.detach() for t in _ssl_views(seed=13))  # lightly's examples detach the targets
    cos = lightly.NegativeCosineSimilarity()
    # BYOL's symmetrised ||.||^2 = 2 - 2 cos per direction; SimSiam's D / 2 per direction
    _assert_same(byol_loss([p1, p2], [t1, t2]).mean(), 4 + 2 * (cos(p1, t2) + cos(p2, t1)), (p1, p2))
    _assert_same(simsiam_loss([p1, p2], [t1, t2]).mean(), (cos(p1, t2) + cos(p2, t1)) / 2, (p1, p2))


@pytest.mark.parametrize("n_local", [0, 2])
def test_swav_equals_lightly(n_local):
    import torch.nn.functional as F

    from plugins.ssl.swav import swav_loss
    from sdk.ssl import sinkhorn

    lightly = _lightly()
    g = torch.Generator().manual_seed(14)
    prototypes = F.normalize(torch.randn(20, 16, generator=g), dim=1)
    scores = [(F.normalize(z, dim=1) @ prototypes.T).detach().requires_grad_()
              for z in _ssl_views(2 + n_local, seed=15)]
    ours = swav_loss(scores, [sinkhorn(s) for s in scores[:2]], temperature=0.1)
    theirs = lightly.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(
        scores[:2], scores[2:])
    _assert_same(ours, theirs[0], scores)


def test_dino_equals_lightly_over_two_steps():
    import sdk
    from sdk import keys

    lightly = _lightly()
    ours = sdk.create("objective", "dino")
    theirs = lightly.DINOLoss(output_dim=16, warmup_teacher_temp=0.04, teacher_temp=0.04,
                              student_temp=0.1, center_momentum=0.9)
    for seed in (16, 17):  # the second step uses the centre both updated after the first
        student = _ssl_views(4, seed=seed)
        teacher = [t.detach() for t in _ssl_views(2, seed=seed + 10)]
        value = ours(sdk.Views(embeddings=student, extras={keys.TEACHER: tuple(teacher) * 2})).value
        _assert_same(value, theirs(teacher_out=teacher, student_out=list(student)), student)
    torch.testing.assert_close(ours.center.center, theirs.center.reshape(-1), rtol=1e-6, atol=1e-7)
