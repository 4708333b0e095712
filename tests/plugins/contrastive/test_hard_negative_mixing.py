"""MoCHi (hard_negative_mixing): synthetic negatives reconstructed as the paper's mixtures of each
query's hardest negatives, the closed-form similarities (values and gradients) against vectors built
one by one, nt_xent with them against a slow loop, and the hardness effect."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive import hard_negative_mixing as hnm
from plugins.contrastive.hard_negative_mixing import hard_negative_mixing, mochi_negatives
from sdk.events import State


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def fit_pair(h, u, v):
    """Coefficients (a, b) with h ~ a u + b v and the relative residual (float64 least squares)."""
    m = np.stack([u, v], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(m, h.astype(np.float64), rcond=None)
    return coef, np.linalg.norm(m @ coef - h) / np.linalg.norm(h)


def hardest(q, pool, mask, n):
    """The n hardest valid negatives of one query, by a sort written out."""
    order = sorted((float(q @ pool[k]), k) for k in range(len(pool)) if mask[k])[::-1]
    return [k for _, k in order[:n]]


def test_synthetic_negatives_are_mixtures_of_the_hardest():
    q, pool = unit(6, 24, seed=0), unit(40, 24, seed=1)
    mask = torch.rand(6, 40, generator=torch.Generator().manual_seed(2)) > 0.3
    n_hard, s, s_prime = 5, 7, 6
    h, valid = mochi_negatives(q, pool, mask, n_hard=n_hard, s=s, s_prime=s_prime,
                               generator=torch.Generator().manual_seed(3))
    assert h.shape == (6, s + s_prime, 24) and bool(valid.all()) and not h.requires_grad
    assert torch.allclose(h.norm(dim=-1), torch.ones(6, s + s_prime), atol=1e-5)
    qn, pn, hn = q.numpy(), pool.numpy(), h.numpy()
    for a in range(6):
        top = hardest(q[a], pool, mask[a], n_hard)
        for m in range(s):  # h = normalize(alpha n_i + (1 - alpha) n_j), n_i, n_j in the hardest
            fits = [fit_pair(hn[a, m], pn[i], pn[j]) for i, j in itertools.combinations(top, 2)]
            fits += [((1.0, 0.0), np.linalg.norm(hn[a, m] - pn[i])) for i in top]  # n_i = n_j
            coef, res = min(fits, key=lambda f: f[1])
            assert res < 1e-4 and min(coef) > -1e-5  # a convex combination (before normalising)
        for m in range(s, s + s_prime):  # h' = normalize(beta q + (1 - beta) n_j), beta < 0.5
            fits = [(fit_pair(hn[a, m], qn[a], pn[j]), j) for j in top]
            ((cq, cn), res), j = min(fits, key=lambda f: f[0][1])
            assert res < 1e-4 and cq > 0 and cn > 0
            assert cq / (cq + cn) < 0.5
            # h' lies on the arc from n_j towards q: at least as hard as n_j
            assert float(q[a] @ h[a, m]) >= float(q[a] @ pool[j]) - 1e-6


def test_mixing_weights_are_uniform_over_their_ranges():
    q, pool = unit(1, 8, seed=4), unit(2, 8, seed=5)  # only two negatives: every mix is on one arc
    h, _ = mochi_negatives(q, pool, n_hard=2, s=0, s_prime=4000,
                           generator=torch.Generator().manual_seed(6))
    betas = []
    for v in h[0].numpy():
        fits = [fit_pair(v, q[0].numpy(), pool[j].numpy()) for j in range(2)]
        (cq, cn), _ = min(fits, key=lambda f: f[1])
        betas.append(cq / (cq + cn))
    betas = np.array(betas)
    assert betas.min() > 0 and betas.max() < 0.5
    assert betas.mean() == pytest.approx(0.25, abs=0.01)  # U(0, 0.5)


def test_invalid_queries_get_masked_negatives_and_fewer_valid_cap_n():
    q, pool = unit(3, 8, seed=7), unit(10, 8, seed=8)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[1, 4] = True  # one valid negative: every pair mix is that negative itself
    h, valid = mochi_negatives(q, pool, mask, n_hard=5, s=3, s_prime=2)
    assert valid.tolist() == [[False] * 5, [True] * 5, [False] * 5]
    assert torch.allclose(h[1, :3], pool[4].expand(3, -1), atol=1e-6)
    sims, valid = hard_negative_mixing(q, pool, mask, n_hard=5, s=3, s_prime=2)
    assert sims.shape == (3, 5) and valid.tolist() == [[False] * 5, [True] * 5, [False] * 5]
    assert torch.allclose(sims[1, :3], (q[1] @ pool[4]).expand(3), atol=1e-6)


def reference_sims(z, pool, mask, n_hard, s, s_prime, seed):
    """MoCHi written out: each query's hardest negatives by a sort, the draws in the order the
    sampler takes them from its generator, every synthetic vector built one by one and detached,
    and ``z_a . h`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    a = z.shape[0]
    alpha = torch.rand((a, s), generator=g)
    u_i, u_j = torch.rand((a, s), generator=g), torch.rand((a, s), generator=g)
    beta = 0.5 * torch.rand((a, s_prime), generator=g)
    u_q = torch.rand((a, s_prime), generator=g)
    n = F.normalize(pool.double(), dim=1)
    rows = []
    for r in range(a):
        q = (z[r] / z[r].norm()).detach()
        top = hardest(q, n, mask[r] if mask is not None else torch.ones(len(n), dtype=torch.bool), n_hard)

        def pick(u, top=top):
            return n[top[min(int(u * len(top)), len(top) - 1)]]

        hs = [alpha[r, m].double() * pick(u_i[r, m]) + (1 - alpha[r, m].double()) * pick(u_j[r, m])
              for m in range(s)]
        hs += [beta[r, m].double() * q + (1 - beta[r, m].double()) * pick(u_q[r, m]) for m in range(s_prime)]
        rows.append(torch.stack([z[r] @ (h / h.norm()).detach() for h in hs]))
    return torch.stack(rows)


@pytest.mark.parametrize("block, chunk", [(hnm.GRAM_BLOCK, hnm.GATHER_CHUNK), (60, 7)])
@pytest.mark.parametrize("k, masked", [(30, True), (30, False), (400, True)])  # 400: gathered pairs
def test_closed_form_sims_match_vectors_built_one_by_one(monkeypatch, block, chunk, k, masked):
    monkeypatch.setattr(hnm, "GRAM_BLOCK", block)  # (60, 7): many Gram blocks, many gather chunks
    monkeypatch.setattr(hnm, "GATHER_CHUNK", chunk)
    g = torch.Generator().manual_seed(20)
    z = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()  # not unit
    pool = torch.randn(k, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, k, generator=g) > 0.4 if masked else None
    weight = torch.randn(6, 11, generator=g, dtype=torch.float64)
    sims, valid = hard_negative_mixing(z, pool, mask, n_hard=7, s=6, s_prime=5,
                                       generator=torch.Generator().manual_seed(21))
    want = reference_sims(z, pool, mask, 7, 6, 5, 21)
    assert sims.dtype == torch.float64 and bool(valid.all())
    assert torch.allclose(sims, want, rtol=1e-12, atol=1e-12)
    got_grad, = torch.autograd.grad((weight * sims).sum(), z)
    want_grad, = torch.autograd.grad((weight * want).sum(), z)
    assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    vectors, _ = mochi_negatives(z, pool, mask, n_hard=7, s=6, s_prime=5,
                                 generator=torch.Generator().manual_seed(21))
    assert torch.allclose(torch.einsum("ad,amd->am", z.detach(), vectors), want, atol=1e-12)


def slow_moco_loss(z1, z2, memory, extra, t):
    """NT-Xent over both views, anchor by anchor, in float64: in-batch, memory and synthetic
    negatives in the denominator."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    mem = memory.double()
    b, total = z1.shape[0], 0.0
    for i in range(2 * b):
        p = (i + b) % (2 * b)
        den = sum(torch.exp(z[i] @ z[k] / t) for k in range(2 * b) if k != i)
        den = den + sum(torch.exp(z[i] @ mem[m] / t) for m in range(mem.shape[0]))
        den = den + sum(torch.exp(z[i] @ extra[i, m].double() / t) for m in range(extra.shape[1]))
        total = total - torch.log(torch.exp(z[i] @ z[p] / t) / den)
    return total / (2 * b)


@pytest.mark.parametrize("pool", ["memory", "batch", "both"])
def test_nt_xent_with_mixing_matches_slow_loop(pool):
    g = torch.Generator().manual_seed(9)
    z1 = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_()
    z2 = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_()
    memory = unit(12, 6, seed=10).double()
    views = sdk.Views(embeddings=(z1, z2), extras={"negatives": memory})
    params = dict(n_hard=4, s=3, s_prime=2, pool=pool, seed=11)
    obj = sdk.create("objective", "nt_xent", temperature=0.2,
                     sampler=sdk.create("sampler", "hard_negative_mixing", **params))
    loss = obj(views, sdk.Batch()).value
    normed = F.normalize(torch.cat([z1, z2]), dim=1).detach()
    other = torch.arange(10)[:, None] % 5 != torch.arange(10)[None, :] % 5
    pool_, mask = {"memory": (memory, None), "batch": (normed, other),
                   "both": (torch.cat([memory, normed]), torch.cat([torch.ones(10, 12, dtype=torch.bool),
                                                                    other], dim=1))}[pool]
    extra, _ = mochi_negatives(normed, pool_, mask, n_hard=4, s=3, s_prime=2,  # the same draws
                               generator=torch.Generator().manual_seed(11))
    assert extra.shape == (10, 5, 6)
    expected = slow_moco_loss(z1, z2, memory, extra, 0.2)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)  # float32 logits
    got = torch.autograd.grad(loss, (z1, z2))
    want = torch.autograd.grad(expected, (z1, z2))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_no_synthetic_negatives_is_plain_infonce():
    g = torch.Generator().manual_seed(12)
    views = sdk.Views(embeddings=(torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)))
    mixed = sdk.create("objective", "nt_xent", sampler=sdk.create(
        "sampler", "hard_negative_mixing", s=0, s_prime=0, pool="batch"))
    assert torch.allclose(mixed(views).value, sdk.create("objective", "nt_xent")(views).value)


def test_mixing_the_hardest_raises_the_loss_more_than_mixing_any():
    g = torch.Generator().manual_seed(13)
    z1 = torch.randn(32, 16, generator=g)
    z2 = z1 + 0.3 * torch.randn(32, 16, generator=g)
    views = sdk.Views(embeddings=(z1, z2), extras={"negatives": unit(512, 16, seed=14)})
    batch = sdk.Batch(index=torch.arange(32))

    def loss(**params):
        sampler = sdk.create("sampler", "hard_negative_mixing", seed=0, **params)
        return float(sdk.create("objective", "nt_xent", temperature=0.2, sampler=sampler)(views, batch).value)

    plain = loss(s=0, s_prime=0)
    hard = loss(n_hard=16, s=64, s_prime=0)
    anywhere = loss(n_hard=512, s=64, s_prime=0)  # N = queue size: mixes of random negatives
    query_mixes = loss(n_hard=16, s=0, s_prime=64)
    assert plain < anywhere < hard < query_mixes


def test_memory_entries_of_the_anchor_itself_are_never_mixed():
    z = unit(4, 8, seed=15)
    memory = torch.cat([z, -z])  # entries 0..3 are the anchors' own keys: the hardest by far
    views = sdk.Views(embeddings=(z, z), extras={"negatives": memory,
                                                 "negatives_index": torch.arange(8)})
    pairs = sdk.create("sampler", "hard_negative_mixing", n_hard=1, s=2, s_prime=0,
                       seed=0).pairs(views, sdk.Batch(index=torch.arange(4)))
    assert pairs.extra_negatives is None  # similarities only: no [A, s + s', D] tensor
    assert pairs.extra_negative_sims.shape == (8, 2)
    assert float(pairs.extra_negative_sims.max()) < 0.999  # cosines: the anchors are unit vectors


def test_bad_parameters_and_a_missing_memory_teacher_are_named():
    for field, value in (("n_hard", 0), ("s", -1), ("s_prime", -2), ("pool", "queue")):
        with pytest.raises(sdk.ConfigError) as err:
            sdk.create("sampler", "hard_negative_mixing", **{field: value})
        assert err.value.param == field

    class NoTeacher:
        teacher = None

    with pytest.raises(sdk.ConfigError) as err:
        sdk.create("sampler", "hard_negative_mixing").on_fit_start(State(trainer=NoTeacher()))
    assert err.value.param == "pool"
    sdk.create("sampler", "hard_negative_mixing", pool="batch").on_fit_start(State(trainer=NoTeacher()))


def test_empty_queue_masks_every_synthetic_negative():
    queue = sdk.create("teacher", "queue", size=16)  # nothing pushed yet: publishes nothing
    g = torch.Generator().manual_seed(16)
    views = sdk.Views(embeddings=(torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)),
                      extras=queue.memory())
    sampler = sdk.create("sampler", "hard_negative_mixing", n_hard=4, s=3, s_prime=2)
    pairs = sampler.pairs(views, sdk.Batch(index=torch.arange(5)))
    assert pairs.extra_negative_sims.shape == (10, 5) and not bool(pairs.extra_negative_mask.any())
    mixed = sdk.create("objective", "nt_xent", sampler=sampler)(views, sdk.Batch(index=torch.arange(5)))
    assert torch.allclose(mixed.value, sdk.create("objective", "nt_xent")(views).value, atol=1e-6)
    queue.push(torch.randn(6, 8, generator=g), torch.arange(6))
    views = views.evolve(extras=queue.memory())
    pairs = sampler.pairs(views, sdk.Batch(index=torch.arange(5)))
    assert bool(pairs.extra_negative_mask.all())


def test_seeded_generator_state_round_trips():
    views, batch = sdk.create("sampler", "hard_negative_mixing").example_inputs(
        8, torch.Generator().manual_seed(0))
    a = sdk.create("sampler", "hard_negative_mixing", n_hard=4, s=3, s_prime=2, seed=5)
    a.pairs(views, batch)
    b = sdk.create("sampler", "hard_negative_mixing", n_hard=4, s=3, s_prime=2, seed=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.pairs(views, batch).extra_negative_sims, b.pairs(views, batch).extra_negative_sims)
    assert not math.isnan(float(a.pairs(views, batch).extra_negative_sims.sum()))
