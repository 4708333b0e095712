"""Mixed Barlow Twins against the authors' formula written as float64 loops (value and
gradient), its mixing step in the Trainer, and a resumed run."""

import types

import pytest
import torch

import sdk
from plugins.ssl.mixed_barlow_twins import MIXED, MixedBarlowTwins, mixed_barlow_twins_loss
from sdk.testing import check_resume


def _norm(z, eps=1e-5):
    n, d = z.shape
    out = [[None] * d for _ in range(n)]
    for i in range(d):
        mean = sum(z[b, i] for b in range(n)) / n
        var = sum((z[b, i] - mean) ** 2 for b in range(n)) / n
        for b in range(n):
            out[b][i] = (z[b, i] - mean) / torch.sqrt(var + eps)
    return out


def slow(z1, z2, z_m, perm, alpha, lambd, scale):
    """mix-bt's train step as loops: standardise each view, then index the second by ``perm``."""
    n, d = z1.shape
    a, b, m = _norm(z1), _norm(z2), _norm(z_m)
    bp = [b[perm[k]] for k in range(n)]

    def corr(x, y, i, j):
        return sum(x[k][i] * y[k][j] for k in range(n)) / n

    bt, mix = 0, 0
    for i in range(d):
        for j in range(d):
            c = corr(a, b, i, j)
            bt = bt + ((1 - c) ** 2 if i == j else lambd * c ** 2)
            for v in (a, b):
                gt = alpha * corr(a, v, i, j) + (1 - alpha) * corr(bp, v, i, j)
                mix = mix + (corr(m, v, i, j) - gt) ** 2
    return bt, scale * lambd * mix


def _inputs(n=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1, z2, z_m = (torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    return z1, z2, z_m, torch.randperm(n, generator=g)


@pytest.mark.parametrize("alpha", [0.3, 0.85])
def test_value_and_gradient_match_the_authors_formula(alpha):
    z1, z2, z_m, perm = _inputs()
    a = torch.tensor(alpha, dtype=torch.float64)
    bt, mix = mixed_barlow_twins_loss(z1, z2, z_m, z2[perm], a, lambd=0.05, mix_scale=3.0)
    want_bt, want_mix = slow(z1, z2, z_m, perm.tolist(), alpha, 0.05, 3.0)
    assert bt.item() == pytest.approx(want_bt.item(), rel=1e-10)
    assert mix.item() == pytest.approx(want_mix.item(), rel=1e-10)
    got = torch.autograd.grad(bt + mix, (z1, z2, z_m))
    ref = torch.autograd.grad(want_bt + want_mix, (z1, z2, z_m))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)


def test_the_plugin_takes_a_weight_per_sample_and_its_defaults_are_the_authors():
    z1, z2, z_m, perm = _inputs(n=6)
    obj = sdk.create("objective", "mixed_barlow_twins")
    assert (obj.lambd, obj.mix_scale, obj.alpha_a, obj.alpha_b) == (1 / 128, 4.0, 1.0, 1.0)
    alpha = torch.full((6,), 0.4, dtype=torch.float64)
    loss = obj(sdk.Views(embeddings=(z1, z2), extras={MIXED: (z_m, z2[perm], alpha)}))
    bt, mix = slow(z1, z2, z_m, perm.tolist(), 0.4, 1 / 128, 4.0)
    assert loss.value.item() == pytest.approx((bt + mix).item(), rel=1e-10)
    assert loss.logs["mixup"].item() == pytest.approx(mix.item(), rel=1e-10)
    # without the mixed view (validation) it is Barlow Twins with the same lambda
    plain = sdk.create("objective", "barlow_twins", lambd=1 / 128)(sdk.Views(embeddings=(z1, z2)))
    assert obj(sdk.Views(embeddings=(z1, z2))).value.item() == pytest.approx(plain.value.item())


def test_a_mix_of_embeddings_that_stays_a_mix_after_standardisation_costs_nothing():
    # two views whose standardised embeddings are equal: the mixed sample's target is the
    # standardised view itself, met exactly when z_m is that view (the paper's linearity prior)
    z1, _, _, perm = _inputs(n=9)
    z2 = 2 * z1.detach() + 1
    obj = MixedBarlowTwins()
    same = obj(sdk.Views(embeddings=(z1, z2), extras={MIXED: (z1, z1[perm], torch.tensor(1.0))}))
    assert same.logs["mixup"].item() == pytest.approx(0.0, abs=1e-12)
    off = obj(sdk.Views(embeddings=(z1, z2), extras={MIXED: (z1[perm], z1[perm], torch.tensor(1.0))}))
    assert off.logs["mixup"].item() > 1e-3


def test_after_forward_encodes_the_mix_of_the_two_view_inputs():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x1, x2 = torch.randn(8, 5), torch.randn(8, 5)
    views = sdk.Views(embeddings=(model(x1), model(x2)))
    state = types.SimpleNamespace(trainer=types.SimpleNamespace(view_inputs=[x1, x2]), model=model,
                                  views=views)
    obj = MixedBarlowTwins(alpha_a=2.0, alpha_b=5.0)
    torch.manual_seed(3)
    obj.after_forward(state)
    torch.manual_seed(3)
    alpha = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(5.0)).sample()
    perm = torch.randperm(8)
    z_m, z_p, a = state.views.extras[MIXED]
    torch.testing.assert_close(z_m, model(alpha * x1 + (1 - alpha) * x2[perm]))
    torch.testing.assert_close(z_p, views.embeddings[1][perm])
    assert a.shape == (8,) and torch.all(a == alpha)
    assert z_m.requires_grad  # the mixed branch is trained


def test_bad_mixed_extras_are_named():
    z1, z2, z_m, perm = _inputs(n=5)
    obj = MixedBarlowTwins()
    with pytest.raises(sdk.ShapeError, match="mixed_barlow_twins.*z_partner.*\\[5, 3\\].*\\[4, 3\\]"):
        obj(sdk.Views(embeddings=(z1, z2), extras={MIXED: (z_m, z2[:4], torch.tensor(0.5))}))
    with pytest.raises(sdk.ShapeError, match="mixed_barlow_twins.*alpha.*\\[5\\].*\\[2\\]"):
        obj(sdk.Views(embeddings=(z1, z2), extras={MIXED: (z_m, z2, torch.ones(2))}))
    with pytest.raises(sdk.RequirementError, match="mixed_barlow_twins.*exactly 2 views, got 3"):
        obj(sdk.Views(embeddings=(z1, z2, z_m)))


def test_trains_with_the_mixed_view_and_resumes_exactly(tmp_path):
    runs = check_resume(objective=MixedBarlowTwins, tmp_dir=tmp_path)
    assert runs.straight.loss.logs["mixup"] > 0  # the last step's loss had the mixed term
