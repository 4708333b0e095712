"""OBoW against the authors' BoW extraction and prediction written as float64 loops (value and
gradient), its training-time vocabulary and distance updates, bad inputs and a resumed run."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.ssl.online_bag_of_words import OnlineBagOfWords
from sdk import keys
from sdk.testing import check_resume


def slow_target(maps, words, inv_delta, mu):
    """The teacher's BoW by loops: drop the border, squared distances, softmax codes, max over
    the locations, L1 normalisation."""
    b, c, h, w = maps.shape
    out = []
    for i in range(b):
        best = [None] * words.shape[0]
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                d = [sum((maps[i, ch, y, x] - words[k, ch]) ** 2 for ch in range(c))
                     for k in range(words.shape[0])]
                e = [torch.exp(-inv_delta / mu * (dk - min(d))) for dk in d]  # softmax, shifted
                codes = [ek / sum(e) for ek in e]
                best = [ck if bk is None else torch.maximum(bk, ck) for bk, ck in zip(best, codes)]
        total = sum(best)
        out.append(torch.stack([v / total for v in best]))
    return torch.stack(out)


def slow_min_distance(maps, words):
    b, c, h, w = maps.shape
    mins = [min(sum((maps[i, ch, y, x] - words[k, ch]) ** 2 for ch in range(c))
                for k in range(words.shape[0]))
            for i in range(b) for y in range(1, h - 1) for x in range(1, w - 1)]
    return sum(mins) / len(mins)


def slow_loss(obj, z, words, target):
    """KL(y || softmax(kappa omega^T z)) with the generator in eval mode (batch norm with its
    initial running statistics: x / sqrt(1 + eps)), averaged over the batch."""
    lin1, bn, _, lin2 = obj.generator.net
    omegas = []
    for k in range(words.shape[0]):
        wk = words[k] / torch.sqrt((words[k] ** 2).sum())
        hid = torch.relu(lin1.weight @ wk / math.sqrt(1 + bn.eps) * bn.weight + bn.bias)
        o = lin2.weight @ hid + lin2.bias
        omegas.append(o / torch.sqrt((o ** 2).sum()))
    total = 0
    for i in range(z.shape[0]):
        logits = [obj.kappa * (z[i] * om).sum() for om in omegas]
        log_norm = torch.logsumexp(torch.stack(logits), 0)
        for k in range(words.shape[0]):
            if target[i, k] > 0:
                total = total + target[i, k] * (torch.log(target[i, k]) - (logits[k] - log_norm))
    return total / z.shape[0]


def _setup(train, b=3, c=3, h=5, w=4, k=5, dim=4, seed=0):
    torch.manual_seed(seed)
    obj = OnlineBagOfWords(dim=dim, word_dim=c, num_words=k, hidden_dim=6).double().train(train)
    g = torch.Generator().manual_seed(seed)
    obj.words.copy_(torch.rand(k, c, generator=g, dtype=torch.float64) + 0.1)  # no zero word
    maps = torch.randn(b, c, h, w, generator=g, dtype=torch.float64).relu()
    z0 = torch.randn(b, dim, generator=g, dtype=torch.float64)
    z1 = torch.randn(b, dim, generator=g, dtype=torch.float64).requires_grad_()
    views = sdk.Views(embeddings=(z0, z1), extras={keys.TEACHER: (maps, maps.flip(0))})
    return obj, views, maps, z1


def test_loss_and_gradient_match_the_authors_bow_and_prediction():
    obj, views, maps, z1 = _setup(train=False)
    words = obj.words.clone()
    loss = obj(views)
    target = slow_target(maps, words, 15.0, 0.5)
    torch.testing.assert_close(target.sum(1), torch.ones(3, dtype=torch.float64))
    want = slow_loss(obj, z1, words, target)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-9)
    params = [z1, *obj.generator.parameters()]
    got = torch.autograd.grad(loss.value, params, allow_unused=True)
    ref = torch.autograd.grad(want, params, allow_unused=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)
    # eval: the vocabulary and the distance mean stay as they were
    assert torch.equal(obj.words, words) and obj.min_distance_mean.item() == 0.5


def test_a_training_step_updates_the_distance_mean_first_then_queues_local_averages():
    obj, views, maps, z1 = _setup(train=True, b=3, h=7, w=7, k=5)
    words = obj.words.clone()
    obj.ptr.fill_(4)
    loss = obj(views)
    mu = 0.99 * 0.5 + 0.01 * slow_min_distance(maps, words)
    assert obj.min_distance_mean.item() == pytest.approx(mu.item(), rel=1e-9)
    assert loss.per_sample.mean().item() == pytest.approx(loss.value.item())
    # the queue: slots 4, 0, 1 (ring) hold one 3x3 average of each sample's cropped map
    crop = maps[:, :, 1:-1, 1:-1]
    for i, slot in enumerate((4, 0, 1)):
        options = [crop[i, :, y:y + 3, x:x + 3].mean((1, 2)) for y in range(3) for x in range(3)]
        assert any(torch.allclose(obj.words[slot], o) for o in options)
    torch.testing.assert_close(obj.words[2:4], words[2:4])
    assert obj.ptr.item() == 2


def test_the_training_loss_uses_the_updated_mean_and_the_old_vocabulary():
    obj, views, maps, z1 = _setup(train=True, b=2, h=5, w=5, k=4, seed=3)
    words = obj.words.clone()
    bn_state = {k: v.clone() for k, v in obj.generator.state_dict().items()}
    loss = obj(views)
    mu = 0.99 * 0.5 + 0.01 * slow_min_distance(maps, words)
    target = slow_target(maps, words, 15.0, mu)
    obj.generator.load_state_dict(bn_state)
    omega = obj.generator.train()(words)  # batch statistics, as in the training forward
    want = F.kl_div(F.log_softmax(obj.kappa * z1 @ omega.T, -1), target, reduction="batchmean")
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-9)


def test_defaults_are_the_authors():
    obj = sdk.create("objective", "online_bag_of_words")
    assert (obj.num_words, obj.inv_delta, obj.kappa.item(), obj.pool, obj.distance_momentum) == (
        8192, 15.0, 8.0, "max", 0.99)
    assert not obj.kappa.requires_grad and obj.min_distance_mean.item() == 0.5
    assert bool((obj.words >= 0).all())  # max(0, N(0, 1)) initial words
    teacher = sdk.create("teacher", "online_bag_of_words")
    assert (teacher.momentum, teacher.final_momentum) == (0.99, 1.0)


def test_the_teacher_publishes_the_backbones_features():
    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)

        def features(self, x):
            return self.body(x)

        def forward(self, x):
            return self.head(self.features(x))

    enc = Enc()
    teacher = sdk.create("teacher", "online_bag_of_words")
    teacher.attach(enc)
    x = torch.randn(4, 5)
    torch.testing.assert_close(teacher(x), enc.body(x))


def test_bad_inputs_are_named():
    obj, views, maps, z1 = _setup(train=False)
    with pytest.raises(sdk.ShapeError, match="online_bag_of_words.*4 channels.*word_dim=3"):
        obj(views.evolve(extras={keys.TEACHER: (torch.randn(3, 4, 5, 5),)}))
    with pytest.raises(sdk.ShapeError, match="online_bag_of_words.*embeddings\\[1\\].*\\[B, 4\\]"):
        obj(views.evolve(embeddings=(torch.randn(3, 7), torch.randn(3, 7))))
    with pytest.raises(sdk.ShapeError, match="online_bag_of_words.*too small"):
        obj(views.evolve(extras={keys.TEACHER: (torch.randn(3, 3, 2, 5),)}))
    with pytest.raises(sdk.ShapeError, match="online_bag_of_words.*2 rows.*3 samples"):
        obj(views.evolve(extras={keys.TEACHER: (maps[:2],)}))
    tokens = OnlineBagOfWords(dim=4, word_dim=3, num_words=5, update="local_average").double()
    with pytest.raises(sdk.ShapeError, match="local_average.*feature maps"):
        tokens(views.evolve(extras={keys.TEACHER: (torch.randn(3, 6, 3, dtype=torch.float64),)}))
    with pytest.raises(sdk.RequirementError, match="online_bag_of_words.*2 views"):
        obj(views.evolve(embeddings=(z1,)))


def test_trains_with_its_teacher_and_resumes_exactly(tmp_path):
    runs = check_resume(objective=lambda: OnlineBagOfWords(dim=4, word_dim=4, num_words=12,
                                                           hidden_dim=8),
                        teacher=lambda: sdk.create("teacher", "online_bag_of_words"),
                        tmp_dir=tmp_path)
    obj = runs.straight.objective
    assert obj.ptr.item() == (6 * 8) % 12 and obj.min_distance_mean.item() != 0.5
