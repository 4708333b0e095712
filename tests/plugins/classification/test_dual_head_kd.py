"""dual_head_kd against written-out BinaryKL / BinaryKLNorm / softmax KL (value and gradient),
kd_weight = 0 is cross-entropy, the heads' gradients are separate, and a distillation
through the Trainer from a FrozenTeacher."""

import functools

import pytest
import torch

import sdk
from sdk import keys
from sdk.classification import FrozenTeacher
from sdk.interfaces import Encoder


def sig(x):
    return 1 / (1 + torch.exp(-x))


def slow_kd(a, v, temperature, kind):
    rows = []
    for i in range(a.shape[0]):
        total = torch.zeros((), dtype=a.dtype)
        c = range(a.shape[1])
        if kind == "softmax_kl":
            ls = torch.log(sum(torch.exp(a[i, k] / temperature) for k in c))
            lt = torch.log(sum(torch.exp(v[i, k] / temperature) for k in c))
            for k in c:
                p = torch.exp(v[i, k] / temperature - lt)
                total = total + p * ((v[i, k] / temperature - lt) - (a[i, k] / temperature - ls))
        for k in c if kind != "softmax_kl" else ():
            if kind == "binary_kl":
                p, q = sig(v[i, k] / temperature), sig(a[i, k] / temperature)
            else:
                p, q = 0.5, sig((a[i, k] - v[i, k]) / temperature)
            total = total + p * torch.log(torch.as_tensor(p, dtype=a.dtype) / q) \
                + (1 - p) * torch.log(torch.as_tensor(1 - p, dtype=a.dtype) / (1 - q))
        rows.append(temperature ** 2 * total)
    return torch.stack(rows)


def inputs(seed=0, b=5, c=4, d=3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = 3 * torch.randn(b, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    return z, h, v, y


def run(obj, z, h, v, y):
    return obj(sdk.Views(logits=z, extras={keys.TEACHER: (v,), keys.FEATURES: (h,)}), sdk.Batch(targets=y))


@pytest.mark.parametrize("kind", ["binary_kl", "binary_kl_norm", "softmax_kl"])
def test_matches_formula_value_and_gradient(kind):
    z, h, v, y = inputs()
    obj = sdk.create("objective", "dual_head_kd", num_classes=4, temperature=2.0, ce_weight=0.7,
                     kd_weight=1.5, kd=kind).double()
    got = run(obj, z, h, v, y)
    a = h @ obj.aux_head.weight.T + obj.aux_head.bias
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    want = 0.7 * ce + 1.5 * slow_kd(a, v, 2.0, kind)
    assert torch.allclose(got.per_sample, want, rtol=1e-10)
    params = [z, h, obj.aux_head.weight, obj.aux_head.bias]
    g1 = torch.autograd.grad(got.value, params)
    g2 = torch.autograd.grad(want.mean(), params)
    for x1, x2 in zip(g1, g2):
        assert torch.allclose(x1, x2, rtol=1e-8, atol=1e-12)


def test_heads_are_separate_and_kd_weight_zero_is_cross_entropy():
    z, h, v, y = inputs(1)
    obj = sdk.create("objective", "dual_head_kd", num_classes=4).double()
    loss = run(obj, z, h, v, y)
    gz, gh = torch.autograd.grad(loss.value, [z, h])
    ce = torch.nn.functional.cross_entropy(z, y)
    assert torch.allclose(gz, torch.autograd.grad(ce, z)[0], rtol=1e-12)  # the main head: CE only
    kd = obj.kd_weight * slow_kd(obj.aux_logits(h), v, obj.temperature, "binary_kl").mean()
    assert torch.allclose(gh, torch.autograd.grad(kd, h)[0], rtol=1e-10)  # the features: KD only
    plain = sdk.create("objective", "dual_head_kd", num_classes=4, kd_weight=0.0).double()
    assert run(plain, z, h, v, y).value.item() == pytest.approx(ce.item(), rel=1e-12)


def test_zero_at_the_teacher_and_defaults():
    from plugins.classification.dual_head_kd import binary_kl, binary_kl_norm

    v = torch.randn(4, 6, dtype=torch.float64)
    assert binary_kl(v, v, 4.0).abs().max() < 1e-12 and binary_kl_norm(v, v, 4.0).abs().max() < 1e-12
    assert (binary_kl(v + 0.3, v, 4.0) > 0).all()
    obj = sdk.create("objective", "dual_head_kd")
    assert (obj.temperature, obj.ce_weight, obj.kd_weight, obj.kd) == (4.0, 1.0, 1.0, "binary_kl")


def test_errors():
    z, h, v, y = inputs()
    obj = sdk.create("objective", "dual_head_kd", num_classes=4)
    with pytest.raises(sdk.ShapeError, match=r"dual_head_kd: Views.extras\['features'\] must hold"):
        run(obj, z, h[:2], v, y)
    with pytest.raises(sdk.ShapeError, match=r"dual_head_kd: Views.logits has 4 classes, but num_classes=3"):
        run(sdk.create("objective", "dual_head_kd", num_classes=3), z, h, v, y)
    with pytest.raises(sdk.RequirementError, match=r"needs extras\['features'\]"):
        obj(sdk.Views(logits=z, extras={keys.TEACHER: (v,)}), sdk.Batch(targets=y))
    with pytest.raises(sdk.ConfigError, match="kd"):
        sdk.create("objective", "dual_head_kd", kd="mse")


class Student(Encoder):
    out_dim = 4

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 4)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def test_the_auxiliary_head_learns_the_teacher_through_the_trainer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    torch.manual_seed(0)
    teacher_net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    y = teacher_net(x).argmax(1)
    student = Student()
    obj = sdk.create("objective", "dual_head_kd", num_classes=4)
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, y), batch_size=64)
    sdk.Trainer(student, obj, functools.partial(torch.optim.Adam, lr=0.05),
                teacher=FrozenTeacher(teacher_net), max_steps=60, progress=False, device="cpu").fit(loader)
    with torch.no_grad():
        h = student.features(x)
        aux = (obj.aux_logits(h).argmax(1) == y).float().mean().item()
        main = (student(x).argmax(1) == y).float().mean().item()
    assert aux > 0.9 and main > 0.9, (aux, main)
