"""MYOW against brute-force mining and the authors' loss as float64 loops (value and
gradient), its reduction to BYOL at w = 0, its schedules, and a killed-and-resumed run."""

import math
import types

import pytest
import torch

import sdk
from plugins.ssl.myow import MYOW, mine_neighbours, mined_weight
from sdk import keys
from sdk.testing import check_resume


def _cos_dist(a, b):
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(x) ** 2 for x in b))
    return 2 - 2 * sum(float(x) * float(y) for x, y in zip(a, b)) / (na * nb)


def brute_mine(anchors, pool, k, pick):
    out = []
    anchors, pool = anchors.detach(), pool.detach()
    for i in range(anchors.shape[0]):
        d = sorted((_cos_dist(anchors[i], pool[j]), j) for j in range(pool.shape[0]) if j != i)
        out.append(d[:k][pick[i]][1])
    return out


def test_mining_is_a_brute_force_knn_without_self():
    g = torch.Generator().manual_seed(0)
    z, pool = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    pool[3] = z[3] * 5  # its own row is the nearest: it must not be mined
    for k in (1, 3):
        pick = torch.randint(k, (9,), generator=g)
        got = mine_neighbours(z, pool, k, torch.arange(9), pick)
        assert got.tolist() == brute_mine(z, pool, k, pick.tolist())
    assert mine_neighbours(z, pool, 1, torch.arange(9), torch.zeros(9, dtype=torch.long))[3] != 3


def _make(**kw):
    torch.manual_seed(0)
    return MYOW(dim=3, hidden_dim=5, **kw).double().eval()


def _inputs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = tuple(torch.randn(n, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    t = tuple(torch.randn(n, 3, generator=g, dtype=torch.float64) for _ in range(2))
    return sdk.Views(embeddings=z, extras={keys.TEACHER: t})


def _reg(p, t, i):
    """2 - 2 cos(p_i, sg(t_i)) as a scalar loop."""
    d = p.shape[1]
    np_ = torch.sqrt(sum(p[i, c] ** 2 for c in range(d)))
    nt = math.sqrt(sum(float(t[i, c]) ** 2 for c in range(d)))
    return 2 - 2 * sum(p[i, c] * float(t[i, c]) for c in range(d)) / (np_ * nt)


def slow(obj, views, pick, w):
    (z1, z2), (t1, t2) = views.embeddings, views.extras[keys.TEACHER]
    n = z1.shape[0]
    q1, q2 = obj.predictor(z1), obj.predictor(z2)
    j = brute_mine(z1, t1, obj.k if obj.k < n else n - 1, pick)
    with torch.no_grad():
        v_target = obj.target_projector_m(t1[j])
    q_m = obj.predictor_m(obj.projector_m(z1))
    total = 0
    for i in range(n):
        byol = (_reg(q1, t2, i) + _reg(q2, t1, i)) / 2
        total = total + byol / (1 + w) + w / (1 + w) * _reg(q_m, v_target, i)
    return total / n


@pytest.mark.parametrize("k", [1, 2])
def test_value_and_gradient_match_the_loop(k):
    obj = _make(k=k, max_weight=0.7)
    views = _inputs()
    torch.manual_seed(5)
    loss = obj(views)
    torch.manual_seed(5)
    pick = torch.randint(k, (6,)).tolist()
    want = slow(obj, views, pick, 0.7)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    params = [p for p in obj.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss.value, [*views.embeddings, *params])
    ref = torch.autograd.grad(want, [*views.embeddings, *params])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # the teacher's outputs and the momentum projector receive no gradient
    assert all(not p.requires_grad for p in obj.target_projector_m.parameters())


def test_without_the_mined_term_it_is_byol_averaged_over_the_two_directions():
    obj = _make(max_weight=0.0)
    byol = sdk.create("objective", "byol", dim=3, hidden_dim=5).double().eval()
    byol.predictor.load_state_dict(obj.predictor.state_dict())
    views = _inputs()
    torch.testing.assert_close(obj(views).per_sample, byol(views).per_sample / 2)


def test_weight_schedule_and_defaults():
    assert mined_weight(0, 100, 1.0, 0.1, 0.6) == 0.0
    assert mined_weight(35, 100, 1.0, 0.1, 0.6) == pytest.approx(0.5)
    assert mined_weight(60, 100, 2.0, 0.1, 0.6) == 2.0
    assert mined_weight(7, None, 2.0, 0.1, 0.6) == 2.0
    obj = sdk.create("objective", "myow")
    assert (obj.k, obj.max_weight, obj.warmup, obj.rampup, obj.momentum) == (4, 1.0, 0.0, 1.0, 0.996)
    obj.set_progress(25, 100)
    assert obj.mined_loss_weight == pytest.approx(0.25)


def test_the_momentum_projector_follows_the_online_one():
    obj = _make(momentum=0.9, final_momentum=0.9)
    before = [p.detach().clone() for p in obj.target_projector_m.parameters()]
    with torch.no_grad():
        for p in obj.projector_m.parameters():
            p.add_(1.0)
    state = types.SimpleNamespace(step=3, trainer=types.SimpleNamespace(total_steps=10))
    obj.after_optimizer_step(state)
    for t, b, s in zip(obj.target_projector_m.parameters(), before, obj.projector_m.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_a_batch_of_one_is_refused_by_name():
    obj = _make().train()
    with pytest.raises(sdk.ShapeError, match="'myow'"):
        obj(_inputs(n=1))


def test_trains_and_resumes_exactly(tmp_path):
    runs = check_resume(objective=lambda: MYOW(dim=4, hidden_dim=8, k=2),
                        teacher=lambda: sdk.create("teacher", "ema"), tmp_dir=tmp_path)
    obj = runs.straight.objective
    assert runs.straight.loss.logs["mined"] > 0
    online = torch.cat([p.flatten() for p in obj.projector_m.parameters()])
    target = torch.cat([p.flatten() for p in obj.target_projector_m.parameters()])
    assert not torch.equal(online, target)  # the copy lags the trained projector
