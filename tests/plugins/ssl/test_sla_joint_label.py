"""SLA against float64 loops (value, gradient, aggregation), its rotation views, and on digits
(the paper's claim: joint labels beat rotation augmentation with the class label alone)."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.ssl.sla_joint_label import aggregate, joint_labels, sla_rotations
from sdk import keys


def slow_ce(z, label):
    logits = [z[c] for c in range(z.shape[0])]
    top = max(float(v.detach()) for v in logits)
    return -(z[label] - top - torch.log(sum(torch.exp(v - top) for v in logits)))


def slow_sla(zs, y):
    """1/M sum_j CE(z_j, (y, j)), joint label y M + j, per sample and averaged, as loops."""
    m, b = len(zs), y.shape[0]
    return sum(sum(slow_ce(zs[j][i], int(y[i]) * m + j) for j in range(m)) / m for i in range(b)) / b


def slow_aggregate(zs, i):
    m, n = len(zs), zs[0].shape[1] // len(zs)
    return [sum(zs[j][i, c * m + j] for j in range(m)) / m for c in range(n)]


def slow_sd(zs, u, y, tau, beta):
    b, n = y.shape[0], u.shape[1]
    total = 0.0
    for i in range(b):
        s = [float(v) / tau for v in slow_aggregate(zs, i)]  # a constant: stop-gradient
        p = [math.exp(v) / sum(math.exp(w) for w in s) for v in s]
        log_q = [u[i, c] / tau - torch.logsumexp(u[i] / tau, 0) for c in range(n)]
        kl = sum(p[c] * (math.log(p[c]) - log_q[c]) for c in range(n))
        total = total + tau ** 2 * kl + beta * slow_ce(u[i], int(y[i]))
    return slow_sla(zs, y) + total / b


def _inputs(b=5, n=3, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = tuple(torch.randn(b, n * m, generator=g, dtype=torch.float64).requires_grad_() for _ in range(m))
    return zs, torch.randint(0, n, (b,), generator=g)


def test_joint_label_round_trips():
    y, j = torch.arange(10).repeat_interleave(4), torch.arange(4).repeat(10)
    joint = joint_labels(y, j, 4)
    assert sorted(joint.tolist()) == list(range(40))
    assert torch.equal(joint // 4, y) and torch.equal(joint % 4, j)


def test_value_and_gradient_match_the_loop():
    zs, y = _inputs()
    loss = sdk.create("objective", "sla_joint_label")(sdk.Views(embeddings=zs), sdk.Batch(targets=y))
    want = slow_sla(zs, y)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-12)
    assert loss.per_sample.shape == (5,)
    for a, b in zip(torch.autograd.grad(loss.value, zs), torch.autograd.grad(want, zs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_aggregation_matches_the_loop_and_is_logged():
    zs, y = _inputs(b=4, n=5, m=4, seed=1)
    agg = aggregate(zs)
    for i in range(4):
        torch.testing.assert_close(agg[i], torch.stack(slow_aggregate(zs, i)))
    loss = sdk.create("objective", "sla_joint_label")(sdk.Views(embeddings=zs), sdk.Batch(targets=y))
    assert loss.logs["aggregated_accuracy"].item() == (agg.argmax(1) == y).double().mean().item()
    single = zs[0][:, 0::4]  # view 0 (identity) at the joint labels (y, 0)
    assert loss.logs["single_accuracy"].item() == (single.argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("tau, beta", [(1.0, 1.0), (2.0, 0.5)])
def test_self_distillation_matches_the_loop(tau, beta):
    zs, y = _inputs(b=4, seed=2)
    obj = sdk.create("objective", "sla_joint_label", self_distillation=True, num_classes=3,
                     feature_dim=6, temperature=tau, beta=beta).double()
    g = torch.Generator().manual_seed(3)
    h = tuple(torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4))
    loss = obj(sdk.Views(embeddings=zs, extras={keys.FEATURES: h}), sdk.Batch(targets=y))
    u = obj.head(h[0])
    want = slow_sd(zs, u, y, tau, beta)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    leaves = [*zs, h[0], *obj.parameters()]
    for a, b in zip(torch.autograd.grad(loss.value, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_rotation_views_are_quarter_turns():
    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9)  # two flat 3x3 images
    views = sla_rotations(shape=(3, 3))
    out = [t(x, sdk.Batch())[0].reshape(2, 3, 3) for t in views]
    img = x.reshape(2, 3, 3)
    assert torch.equal(out[0], img)
    for r in range(3):
        for c in range(3):  # 90 degrees counter-clockwise: out[r, c] = in[c, W - 1 - r]
            assert torch.equal(out[1][:, r, c], img[:, c, 2 - r])
            assert torch.equal(out[2][:, r, c], img[:, 2 - r, 2 - c])
    assert torch.equal(views[1](out[3].reshape(2, 9), sdk.Batch())[0].reshape(2, 3, 3), img)
    assert [t.turns for t in sla_rotations(m=2)] == [0, 2]


def test_bad_inputs_name_the_plugin_and_field():
    zs, y = _inputs()
    obj = sdk.create("objective", "sla_joint_label")
    with pytest.raises(sdk.ShapeError, match="'sla_joint_label'.*exactly 4 views"):
        obj(sdk.Views(embeddings=zs + zs[:1]), sdk.Batch(targets=y))
    with pytest.raises(sdk.ShapeError, match="'sla_joint_label'.*joint logits"):
        obj(sdk.Views(embeddings=tuple(z[:, :10] for z in zs)), sdk.Batch(targets=y))
    with pytest.raises(sdk.ShapeError, match="'sla_joint_label'.*Batch.targets.*\\[0, 3\\)"):
        obj(sdk.Views(embeddings=zs), sdk.Batch(targets=torch.full((5,), 3)))
    with pytest.raises(sdk.ConfigError, match="sla_joint_label.*feature_dim"):
        sdk.create("objective", "sla_joint_label", self_distillation=True, num_classes=3)
    with pytest.raises(sdk.ShapeError, match="'sla_rotation'.*shape"):
        sdk.create("transform", "sla_rotation")(torch.randn(4, 10), sdk.Batch())
    with pytest.raises(sdk.ShapeError, match="'sla_rotation'.*square"):
        sdk.create("transform", "sla_rotation", shape=(2, 3))(torch.randn(4, 6), sdk.Batch())


def _digits_mlp(out_dim):
    return sdk.create("encoder", "mlp", in_dim=64, out_dim=out_dim, hidden_dims=(256, 256),
                      batch_norm=False)


EPOCHS = 15
SEED = 0


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is much faster than several on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_on_digits_sla_beats_rotation_augmentation(one_thread):
    """The paper's Table 1 at digits scale: training one classifier on the rotated copies with
    their class label (data augmentation, which asks for rotation invariance: a 6 turned is a 9)
    is worse than SLA's joint labels, single view and aggregated alike (seeds 0-3: augmentation
    0.88-0.94, SLA 0.96-0.97). Aggregation's own gain over SLA's single view, which the paper
    reports on CIFAR, is within +-0.01 here (an MLP on 8x8 digits), so it is not asserted."""
    data = sdk.data.load("digits", seed=0)
    x, y = data.test.x, data.test.y
    rotations = sla_rotations((8, 8))
    torch.manual_seed(SEED)
    sla = _digits_mlp(40)
    loader = torch.utils.data.DataLoader(data.train, batch_size=64, shuffle=True)
    sdk.Trainer(sla, sdk.create("objective", "sla_joint_label", num_classes=10),
                functools.partial(torch.optim.Adam, lr=1e-3), transforms=rotations,
                max_epochs=EPOCHS, progress=False, device="cpu").fit(loader)
    with torch.no_grad():
        zs = [sla.eval()(t(x, sdk.Batch())[0]) for t in rotations]
    single = (zs[0][:, 0::4].argmax(1) == y).float().mean().item()
    agg = (aggregate(zs).argmax(1) == y).float().mean().item()

    torch.manual_seed(SEED)
    da = _digits_mlp(10)
    opt = torch.optim.Adam(da.parameters(), lr=1e-3)
    for _ in range(EPOCHS):
        for xb, yb, *_ in loader:
            loss = sum(F.cross_entropy(da(t(xb, sdk.Batch())[0]), yb) for t in rotations) / 4
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        augmented = (da(x).argmax(1) == y).float().mean().item()
    print(f"digits test accuracy: rotation augmentation {augmented:.3f}, SLA single view "
          f"{single:.3f}, SLA aggregated {agg:.3f}")
    assert single > augmented + 0.02
    assert agg > augmented + 0.02
