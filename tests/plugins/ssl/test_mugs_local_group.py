"""mugs_local_group: neighbours equal a brute-force top-n; the InfoNCE equals a slow loop; the
group is a set function of the neighbours (memory order does not matter, missing neighbours are
ignored); the memories, queue and momentum heads follow the authors' updates; the run resumes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.ssl.mugs_local_group import local_group_info_nce, top_neighbours
from sdk import keys
from sdk.testing import check_resume


def small(**kw):
    torch.manual_seed(0)
    params = dict(dim=8, heads=2, top_n=3, out_dim=5, hidden_dim=7, pred_hidden_dim=9,
                  memory_size=12, queue_size=10) | kw
    return sdk.create("objective", "mugs_local_group", **params)


def _views(n=4, views=3, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = tuple(torch.randn(n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(views))
    t = tuple(torch.randn(n, d, generator=g, dtype=dtype) for _ in range(views))
    return sdk.Views(embeddings=z, extras={keys.TEACHER: t})


def test_neighbours_are_the_brute_force_top_n():
    g = torch.Generator().manual_seed(1)
    q, mem = torch.randn(5, 6, generator=g), torch.randn(20, 6, generator=g)
    index = top_neighbours(q, mem, 4)
    for i in range(5):
        scores = []
        for k in range(20):
            c = sum(float(q[i, j] * mem[k, j]) for j in range(6))
            c /= math.sqrt(sum(float(q[i, j]) ** 2 for j in range(6)))
            c /= math.sqrt(sum(float(mem[k, j]) ** 2 for j in range(6)))
            scores.append((c, k))
        assert index[i].tolist() == [k for _, k in sorted(scores, reverse=True)[:4]]


def slow_info_nce(preds, targets, queue, tau, n_global):
    large, small_ = [], []
    for w, t in enumerate(targets):
        for v, p in enumerate(preds):
            if v == w:
                continue
            total = 0
            for i in range(p.shape[0]):
                pos = sum(p[i, j] * float(t[i, j]) for j in range(p.shape[1])) / tau
                negs = [sum(p[i, j] * float(queue[k, j]) for j in range(p.shape[1])) / tau
                        for k in range(queue.shape[0])]
                total = total - pos + torch.log(sum(torch.exp(x) for x in [pos, *negs]))
            (large if v < n_global else small_).append(total / p.shape[0])
    big = sum(large) / len(large)
    return 0.5 * (big + sum(small_) / len(small_)) if small_ else big


@pytest.mark.parametrize("views", [2, 4])
def test_info_nce_value_and_gradient_match_the_loop(views):
    g = torch.Generator().manual_seed(2)
    preds = [F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
             for _ in range(views)]
    targets = [F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
    queue = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    got = local_group_info_nce(preds, targets, queue, 0.2, 2)
    want = slow_info_nce(preds, targets, queue, 0.2, 2)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(got, preds), torch.autograd.grad(want, preds)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_group_is_a_set_function_of_the_neighbours():
    obj = small().eval()
    g = torch.Generator().manual_seed(3)
    x, nb = torch.randn(4, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    out = obj.student(x, nb)
    torch.testing.assert_close(obj.student(x, nb[:, torch.tensor([2, 0, 1])]), out,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(obj.student(x, nb[:, :2]), out)  # every neighbour counts
    assert small(top_n=0)(_views()).value.isfinite()  # top_n = 0: the sample alone


def test_forward_is_the_formula_on_the_memories_and_updates_them_after_the_loss():
    obj = small().train()
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    views = _views(seed=1)
    loss = obj(views).value
    ref = small()  # the same random start (seeded), evaluated by hand
    ref.load_state_dict(before)

    def groups(head, xs, memory):
        return [head(x, memory[top_neighbours(x, memory, 3)]) for x in xs]

    preds = [F.normalize(ref.predictor(p), dim=1)
             for p in groups(ref.student, views.embeddings, before["memory_student"])]
    targets = groups(ref.momentum_heads.target, views.extras[keys.TEACHER][:2], before["memory_teacher"])
    want = local_group_info_nce(preds, targets, before["queue"], 0.2, 2)
    torch.testing.assert_close(loss, want)
    # the queue took this batch's targets (both global crops), the memories its first crop
    torch.testing.assert_close(obj.queue[:8], torch.cat(targets).detach())
    torch.testing.assert_close(obj.queue[8:], before["queue"][8:])
    torch.testing.assert_close(obj.memory_student[:4], views.embeddings[0].detach())
    torch.testing.assert_close(obj.memory_teacher[:4], views.extras[keys.TEACHER][0])
    # a ring: the next batch wraps around the 10-row queue
    obj(_views(seed=2))
    assert int(obj.queue_ptr) == 16 % 10 and int(obj.memory_student_ptr) == 8
    # evaluation mode leaves every buffer as it is
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    obj.eval()(_views(seed=3))
    for k, v in obj.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_momentum_heads_follow_the_student_after_each_step():
    obj = small(momentum=0.9, final_momentum=0.9)
    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(1.0)
    old = [p.clone() for p in obj.momentum_heads.target.parameters()]

    class Trainer:
        total_steps = None

    class State:
        step, trainer = 1, Trainer()

    obj.after_optimizer_step(State())
    for o, t, s in zip(old, obj.momentum_heads.target.parameters(), obj.student.parameters()):
        torch.testing.assert_close(t, 0.9 * o + 0.1 * s)
    assert not any(p.requires_grad for p in obj.momentum_heads.parameters())


def test_authors_defaults_and_bad_input():
    obj = sdk.create("objective", "mugs_local_group")
    assert (obj.dim, obj.top_n, obj.temperature, obj.memory_size, obj.queue_size) == (
        384, 8, 0.2, 65536, 65536)
    assert obj.predictor[0].out_features == 4096 and obj.student.projector[0].out_features == 2048
    assert obj.student.projector[-1].out_features == 256
    assert (obj.momentum_heads.momentum, obj.momentum_heads.final_momentum) == (0.996, 1.0)
    with pytest.raises(sdk.ConfigError, match="mugs_local_group: top_n must be >= 0"):
        small(top_n=-1)
    with pytest.raises(sdk.ConfigError, match="top_n=13 neighbours"):
        small(top_n=13)
    with pytest.raises(sdk.ConfigError, match="multiple of heads"):
        small(heads=3)
    with pytest.raises(sdk.ShapeError, match=r"mugs_local_group.*embeddings\[0\] must be \[B, 8\]"):
        small()(_views(d=6))
    with pytest.raises(sdk.RequirementError, match="teacher"):
        small()(sdk.Views(embeddings=_views().embeddings))


def test_engine_trains_it_and_resume_restores_memories_queue_and_heads(tmp_path):
    check_resume(objective=lambda: small(dim=4, heads=2, memory_size=7, queue_size=9),
                 teacher=lambda: sdk.create("teacher", "ema"), tmp_dir=tmp_path)


def test_the_local_group_pulls_neighbours_together_on_digits():
    """Trained on digits through the engine, a tiny encoder's kNN accuracy rises above its
    random initialisation."""
    from sklearn.datasets import load_digits

    from sdk.data import GaussianNoise, IndexedDataset, RandomMask
    from sdk.metrics import knn_accuracy

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    enc = sdk.create("encoder", "mlp", in_dim=64, out_dim=16, hidden_dims=(64,))
    start = copy.deepcopy(enc)
    obj = small(dim=16, heads=2, top_n=4, out_dim=16, hidden_dim=64, pred_hidden_dim=64,
                memory_size=512, queue_size=512)
    aug = [sdk.data.Compose([GaussianNoise(0.1), RandomMask(0.3)]) for _ in range(2)]
    loader = torch.utils.data.DataLoader(IndexedDataset(x[:1200], y[:1200]), batch_size=128,
                                         shuffle=True)
    sdk.Trainer(enc, obj, torch.optim.Adam, teacher=sdk.create("teacher", "ema", momentum=0.99),
                transforms=aug, max_steps=150, progress=False, device="cpu").fit(loader)
    with torch.no_grad():
        before = knn_accuracy(start(x[:1200]), y[:1200], start(x[1200:]), y[1200:], k=10)
        after = knn_accuracy(enc(x[:1200]), y[:1200], enc(x[1200:]), y[1200:], k=10)
    assert after > before + 0.02
