"""separable_reweighted_at: the loss equals SRAT's weighted cross-entropy plus lambda times the
supervised contrastive separation loss written out anchor by anchor (value, per-sample terms and
gradients, the catalogue's defaults), the class weights are inverse frequencies of mean 1, the separation
term prefers separated classes and ignores the features' scale, the reweighter reduces to
1/B sum w_y l, and on long-tailed digits under PGD the weights raise the minority classes'
robust accuracy."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.training.separable_reweighted_at import class_weights, separation_loss
from sdk import keys
from sdk.types import Batch, Loss, Views


def slow_loss(logits, feats, y, counts, lam, t, gamma):
    """Sample by sample, with Python sums: (1/B) sum w_y CE + lam * mean over anchors with a positive."""
    b = len(y)
    raw = [counts[c] ** -gamma for c in range(len(counts))]
    w = [r / (sum(raw) / len(raw)) for r in raw]
    z = [f / f.norm() for f in feats]
    ce, sep, per = [], [], []
    for i in range(b):
        lse = torch.logsumexp(logits[i], 0)
        ce_i = w[int(y[i])] * (lse - logits[i, int(y[i])])
        pos = [p for p in range(b) if p != i and y[p] == y[i]]
        if pos:
            den = torch.logsumexp(torch.stack([z[i] @ z[a] / t for a in range(b) if a != i]), 0)
            s_i = -sum(z[i] @ z[p] / t - den for p in pos) / len(pos)
            sep.append(s_i)
        else:
            s_i = torch.zeros((), dtype=logits.dtype)
        ce.append(ce_i)
        per.append(ce_i + lam * s_i)
    value = sum(ce) / b + lam * sum(sep) / len(sep)
    return value, torch.stack(per)


def data(seed, b=10, c=3, d=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64).requires_grad_()
    feats = torch.randn(b, d, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 0][:b])
    return logits, feats, y


@pytest.mark.parametrize("lam,t,gamma", [(1.0, 0.1, 1.0), (0.3, 0.5, 0.5), (2.0, 1.0, 0.0)])
def test_loss_and_gradients_equal_the_slow_formula(lam, t, gamma):
    logits, feats, y = data(0)
    counts = (50.0, 10.0, 4.0)
    obj = sdk.create("objective", "separable_reweighted_at", lam=lam, temperature=t, gamma=gamma,
                     class_counts=counts)
    loss = obj(Views(embeddings=(logits,), logits=logits, extras={keys.FEATURES: (feats,)}), Batch(targets=y))
    want, want_per = slow_loss(logits, feats, y, counts, lam, t, gamma)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(loss.per_sample.double(), want_per, rtol=1e-5)
    got = torch.autograd.grad(loss.value, (logits, feats))
    exp = torch.autograd.grad(want, (logits, feats))
    for a, e in zip(got, exp):
        assert torch.allclose(a.double(), e, rtol=1e-4, atol=1e-6)


def test_defaults_and_the_counts_from_labels():
    logits, feats, y = data(1)
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 4)
    obj = sdk.create("objective", "separable_reweighted_at", labels=labels)
    assert (obj.lam, obj.temperature, obj.gamma) == (1.0, 0.1, 1.0)
    loss = obj(Views(embeddings=(logits,), logits=logits, extras={keys.FEATURES: (feats,)}), Batch(targets=y))
    want, _ = slow_loss(logits, feats, y, (50.0, 10.0, 4.0), 1.0, 0.1, 1.0)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-5)


def test_class_weights_are_inverse_frequencies_of_mean_one():
    w = class_weights(torch.tensor([100.0, 10.0]))
    assert torch.allclose(w, torch.tensor([2 / 11, 20 / 11]))
    assert torch.allclose(class_weights(torch.tensor([100.0, 10.0, 3.0]), gamma=0.0), torch.ones(3))
    w = class_weights(torch.tensor([9.0, 1.0]), gamma=0.5)  # 1/3 and 1 over their mean 2/3
    assert torch.allclose(w, torch.tensor([0.5, 1.5]))


def test_without_counts_and_lambda_zero_it_is_cross_entropy_and_features_come_from_the_embedding():
    logits, feats, y = data(2)
    obj = sdk.create("objective", "separable_reweighted_at", lam=0.0)
    loss = obj(Views(embeddings=(logits,), logits=logits), Batch(targets=y))
    assert torch.allclose(loss.value.double(), F.cross_entropy(logits, y))
    with_embedding = sdk.create("objective", "separable_reweighted_at")(
        Views(embeddings=(feats,), logits=logits), Batch(targets=y))
    with_features = sdk.create("objective", "separable_reweighted_at")(
        Views(embeddings=(logits,), logits=logits, extras={keys.FEATURES: (feats,)}), Batch(targets=y))
    assert torch.allclose(with_embedding.value, with_features.value)


def test_separation_prefers_separated_classes_and_ignores_scale():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(12) % 3
    centres = torch.eye(3) * 5
    separated = centres[y] + 0.1 * torch.randn(12, 3, generator=g)
    mixed = torch.randn(12, 3, generator=g)
    l_sep, v = separation_loss(separated, y, 0.1)
    l_mix, _ = separation_loss(mixed, y, 0.1)
    assert v.all() and l_sep.mean() < l_mix.mean()
    assert torch.allclose(separation_loss(7.0 * mixed, y, 0.1)[0], l_mix, atol=1e-5)
    # two identical rows of class 0 and an orthogonal row of class 1, t = 1: log(e + 1) - 1
    lone, valid = separation_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]), 1.0)
    assert valid.tolist() == [True, True, False] and lone[2] == 0
    assert lone[0].item() == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)


def test_reweighter_is_the_weighted_mean():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    y = torch.tensor([0, 1, 1, 0])
    rw = sdk.create("reweighter", "separable_reweighted_at", class_counts=(30.0, 10.0))
    w = rw.weights(per, Batch(targets=y))
    assert torch.allclose(w, torch.tensor([0.5, 1.5, 1.5, 0.5]) / 4)
    reduced = rw.reduce(Loss(value=per.mean(), per_sample=per), Batch(targets=y))
    assert reduced.value.item() == pytest.approx((0.5 * 1 + 1.5 * 2 + 1.5 * 3 + 0.5 * 4) / 4)
    assert torch.allclose(torch.autograd.grad(reduced.value, per)[0], w)
    plain = sdk.create("reweighter", "separable_reweighted_at").reduce(
        Loss(value=per.mean(), per_sample=per), Batch(targets=y))
    assert plain.value.item() == pytest.approx(2.5)


def test_bad_inputs_are_named():
    logits, feats, y = data(4)
    obj = sdk.create("objective", "separable_reweighted_at", class_counts=(3.0, 2.0))
    with pytest.raises(sdk.ShapeError, match="'separable_reweighted_at': the class counts give 2 classes, but Views.logits has 3"):
        obj(Views(embeddings=(logits,), logits=logits), Batch(targets=y))
    with pytest.raises(sdk.ShapeError, match=r"separable_reweighted_at.*features \[10, 5, 1\]"):
        sdk.create("objective", "separable_reweighted_at")(
            Views(embeddings=(logits,), logits=logits, extras={keys.FEATURES: (feats[:, :, None],)}), Batch(targets=y))
    with pytest.raises(sdk.ShapeError, match="separable_reweighted_at.*Batch.targets must lie in"):
        sdk.create("objective", "separable_reweighted_at")(
            Views(embeddings=(logits,), logits=logits), Batch(targets=y + 5))
    with pytest.raises(sdk.ConfigError, match="separable_reweighted_at: the training class counts must be positive"):
        sdk.create("objective", "separable_reweighted_at", class_counts=(3.0, 0.0))
    with pytest.raises(sdk.ConfigError, match="give class_counts or labels, not both"):
        sdk.create("reweighter", "separable_reweighted_at", class_counts=(3.0, 1.0), labels=[0, 1])
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        sdk.create("objective", "separable_reweighted_at", temperature=0.0)
    rw = sdk.create("reweighter", "separable_reweighted_at", class_counts=(3.0, 1.0))
    with pytest.raises(sdk.ShapeError, match="reweighter 'separable_reweighted_at' needs class ids"):
        rw.weights(torch.ones(2), Batch(index=torch.arange(2)))
    with pytest.raises(sdk.ShapeError, match=r"reweighter 'separable_reweighted_at': Batch.targets must lie in \[0, 2\)"):
        rw.weights(torch.ones(2), Batch(targets=torch.tensor([0, 4])))


def long_tailed_digits(seed):
    """Digits in [0, 1]; training classes 0..9 cut to 10^(-c/9) of their samples (imbalance
    ratio 10); 600 held-out balanced test rows."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:600], perm[600:]
    keep = [train[y[train] == c][:round(int((y[train] == c).sum()) * 10 ** (-c / 9))] for c in range(10)]
    return x, y, torch.cat(keep), test


def robust_accuracy_by_group(seed, objective, epochs=15, eps=0.1):
    from sdk.adversarial import pgd

    x, y, train, test = long_tailed_digits(seed)
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU())
    head = torch.nn.Linear(64, 10)
    net = torch.nn.Sequential(body, head)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            xa = pgd(net, x[b], y[b], eps=eps, step_size=eps / 4, steps=5, clip=(0, 1), generator=g)
            h = body(xa)
            loss = objective(Views(embeddings=(head(h),), logits=head(h), extras={keys.FEATURES: (h,)}),
                             Batch(targets=y[b])).value
            opt.zero_grad()
            loss.backward()
            opt.step()
    xa = pgd(net, x[test], y[test], eps=eps, step_size=eps / 4, steps=10, clip=(0, 1), generator=g)
    with torch.no_grad():
        right = net(xa).argmax(1) == y[test]
    minority = y[test] >= 5
    return right[minority].float().mean().item(), right[~minority].float().mean().item()


def test_class_weights_raise_minority_robust_accuracy_on_long_tailed_digits():
    """The paper's observation (2): upweighting the under-represented classes in adversarial
    training raises their robust accuracy (PGD-10, eps = 0.1) and costs the well-represented
    ones (measured at seed 0: classes 5-9 0.13 -> 0.61, classes 0-4 0.76 -> 0.65)."""
    _, y, train, _ = long_tailed_digits(0)
    counts = tuple(torch.bincount(y[train], minlength=10).double().tolist())
    plain = robust_accuracy_by_group(0, sdk.create("objective", "separable_reweighted_at", lam=0.0))
    weighted = robust_accuracy_by_group(
        0, sdk.create("objective", "separable_reweighted_at", lam=0.0, class_counts=counts))
    assert weighted[0] > plain[0] + 0.1
    assert weighted[1] < plain[1]


def test_trains_inside_a_trainer_on_adversarial_examples_of_a_head_encoder():
    """The engine publishes the backbone features of each view as a tuple; the loss reads the
    first view's and trains on the transform's PGD examples."""
    import functools

    from sdk.adversarial import AdversarialExamples
    from sdk.data import IndexedDataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 6, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    backbone = sdk.create("encoder", "mlp", in_dim=6, out_dim=8, hidden_dims=(8,))
    encoder = sdk.create("encoder", "projection_head", backbone=backbone, out_dim=3, hidden_dim=8)
    seen = []

    class Spy(sdk.interfaces.Callback):
        def after_loss(self, state):
            seen.append(state.loss.logs["separation"])

    obj = sdk.create("objective", "separable_reweighted_at", class_counts=tuple(torch.bincount(y).tolist()))
    trainer = sdk.Trainer(encoder, obj, functools.partial(torch.optim.SGD, lr=0.1),
                          transforms=[AdversarialExamples(eps=0.05, steps=2, seed=0)], callbacks=[Spy()],
                          max_steps=3, progress=False, device="cpu")
    trainer.fit(torch.utils.data.DataLoader(IndexedDataset(x, y), batch_size=16))
    assert trainer.step == 3 and len(seen) == 3 and all(torch.isfinite(s) for s in seen)
