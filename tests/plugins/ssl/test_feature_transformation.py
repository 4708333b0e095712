"""Feature transformation: the extrapolation's analytic identities and gradients, the
coefficients' Beta laws (the authors' defaults), negative mixing as a permutation, and the
listener that applies it in training only."""

import pytest
import torch

import sdk
from plugins.ssl.feature_transformation import extrapolate_positives, interpolate_negatives
from sdk.events import State

NEGATIVES = "negatives"


def _pair(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_())


def test_extrapolation_moves_the_pair_apart_along_its_difference():
    q, k = _pair()
    lam = 1 + torch.rand(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    qh, kh = extrapolate_positives(q, k, lam)
    torch.testing.assert_close(qh - kh, (2 * lam - 1) * (q - k))
    torch.testing.assert_close(qh + kh, q + k)
    gq, gk = torch.autograd.grad(qh.sum(), (q, k), retain_graph=True)
    torch.testing.assert_close(gq, lam)
    torch.testing.assert_close(gk, 1 - lam)
    gq, gk = torch.autograd.grad(kh.sum(), (q, k))  # both members of the pair are trained
    torch.testing.assert_close(gq, 1 - lam)
    torch.testing.assert_close(gk, lam)


def test_interpolation_matches_the_loop():
    g = torch.Generator().manual_seed(2)
    n = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mix, perm = torch.rand(4, 3, generator=g, dtype=torch.float64), torch.tensor([2, 0, 3, 1])
    got = interpolate_negatives(n, mix, perm)
    for i in range(4):
        for d in range(3):
            want = mix[i, d] * n[i, d] + (1 - mix[i, d]) * n[int(perm[i]), d]
            assert got[i, d].item() == pytest.approx(want.item(), rel=1e-12)


def _beta_var(a):
    return 1 / (4 * (2 * a + 1))


def test_coefficients_follow_the_papers_beta_laws_and_negatives_mix_a_permutation():
    torch.manual_seed(0)
    ft = sdk.create("sampler", "feature_transformation")
    b, d, m = 8, 4000, 6
    q, k = torch.zeros(b, d, dtype=torch.float64), torch.ones(b, d, dtype=torch.float64)
    memory = torch.arange(m, dtype=torch.float64)[:, None].expand(m, d).contiguous()
    out = ft.transform(sdk.Views(embeddings=(q, k), extras={NEGATIVES: memory}))
    qh, kh = out.embeddings
    lam = 1 - qh  # q^ = lam * 0 + (1 - lam) * 1
    torch.testing.assert_close(kh, lam)
    beta = lam - 1  # ~ Beta(2, 2) per entry
    assert beta.min() >= 0 and beta.max() <= 1
    assert beta.mean().item() == pytest.approx(0.5, abs=0.01)
    assert beta.var().item() == pytest.approx(_beta_var(2.0), rel=0.05)
    mixed = out.extras[NEGATIVES]  # m_d * i + (1 - m_d) * perm(i)
    partner = (2 * mixed.mean(1) - torch.arange(m)).round().long()
    assert sorted(partner.tolist()) == list(range(m))
    moved = partner != torch.arange(m)
    coef = (mixed[moved] - partner[moved, None]) / (torch.arange(m)[moved, None] - partner[moved, None])
    assert coef.mean().item() == pytest.approx(0.5, abs=0.01)
    assert coef.var().item() == pytest.approx(_beta_var(1.6), rel=0.05)


def test_a_queue_not_yet_full_mixes_filled_entries_only():
    torch.manual_seed(1)
    ft = sdk.create("sampler", "feature_transformation", positive=False)
    q, k = _pair(d=3)
    memory = torch.arange(10, dtype=torch.float64)[:, None].expand(10, 3) + 1
    valid = torch.arange(10) < 3
    out = ft.transform(sdk.Views(embeddings=(q, k), extras={NEGATIVES: memory,
                                                            "negatives_mask": valid}))
    mixed = out.extras[NEGATIVES]
    assert bool((mixed[:3] >= 1).all() and (mixed[:3] <= 3).all())  # rows 1..3 only


def test_applied_in_training_only_and_switchable():
    q, k = _pair()
    views = sdk.Views(embeddings=(q, k))
    ft = sdk.create("sampler", "feature_transformation")
    state = State(views=views)
    ft.eval().after_forward(state)
    assert state.views is views
    ft.train().after_forward(state)
    assert not torch.equal(state.views.embeddings[0], q)
    only_neg = sdk.create("sampler", "feature_transformation", positive=False)
    out = only_neg.transform(views)  # no memory: nothing to interpolate
    assert out.embeddings[0] is q and out.embeddings[1] is k


def test_pairs_and_bad_inputs():
    q, k = _pair(b=3)
    ft = sdk.create("sampler", "feature_transformation")
    pairs = ft.pairs(sdk.Views(embeddings=(q, k)), sdk.Batch())
    ids = torch.arange(3).repeat(2)
    assert torch.equal(pairs.positive, ids[:, None] == ids[None, :])
    assert torch.equal(pairs.negative, ~pairs.positive)
    with pytest.raises(sdk.ShapeError, match="'feature_transformation'.*pair of views, got 3"):
        ft.transform(sdk.Views(embeddings=(q, k, q)))
    with pytest.raises(sdk.ShapeError, match="'feature_transformation'.*negatives.*\\[M, 5\\]"):
        ft.transform(sdk.Views(embeddings=(q, k), extras={NEGATIVES: torch.randn(4, 2)}))
    with pytest.raises(sdk.ConfigError, match="feature_transformation.*both off"):
        sdk.create("sampler", "feature_transformation", positive=False, negative=False)


def test_trains_with_nt_xent_and_a_queue():
    """In a Trainer the listener runs each step: the objective sees the queue's negatives
    mixed (every entry between two of the queue's rows, dimension by dimension)."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    encoder = sdk.create("encoder", "mlp", in_dim=6, out_dim=4, hidden_dims=(8,), batch_norm=False)
    jitter = sdk.data.GaussianNoise(std=0.1)
    seen = []

    class Record:
        def after_loss(self, state):
            memory = state.trainer.teacher.memory()
            if memory:
                filled = memory["negatives_mask"]
                seen.append((state.views.extras[NEGATIVES][filled], memory[NEGATIVES][filled]))

    trainer = sdk.Trainer(encoder, sdk.create("objective", "nt_xent", temperature=0.5),
                          sampler=sdk.create("sampler", "feature_transformation"),
                          teacher=sdk.create("teacher", "queue", size=32), transforms=jitter,
                          callbacks=[Record()], max_steps=3, progress=False, device="cpu")
    trainer.fit(torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, torch.zeros(64).long()),
                                            batch_size=16))
    assert trainer.step == 3 and len(seen) == 2
    mixed, memory = seen[-1]
    assert mixed.shape == memory.shape and not torch.equal(mixed, memory)
    low, high = memory.min(0).values, memory.max(0).values
    assert bool(((mixed >= low - 1e-6) & (mixed <= high + 1e-6)).all())
