"""knowledge_distillation against the written-out KL (value and gradient), its limits (alpha = 0
is cross-entropy; at high T the T^2-scaled gradient is (z - v) / C, independent of T) and a
distillation through the Trainer from a FrozenTeacher."""

import functools

import pytest
import torch
import torch.nn.functional as F

import sdk
from sdk import keys
from sdk.classification import FrozenTeacher


def slow(z, v, y, temperature, alpha):
    rows = []
    for i in range(z.shape[0]):
        c = range(z.shape[1])
        ls = torch.log(sum(torch.exp(z[i, k] / temperature) for k in c))
        lt = torch.log(sum(torch.exp(v[i, k] / temperature) for k in c))
        kl = sum(torch.exp(v[i, k] / temperature - lt) * ((v[i, k] / temperature - lt)
                                                           - (z[i, k] / temperature - ls)) for k in c)
        ce = torch.log(sum(torch.exp(z[i, k]) for k in c)) - z[i, y[i]]
        rows.append(alpha * temperature ** 2 * kl + (1 - alpha) * ce)
    return torch.stack(rows)


def run(obj, z, v, y=None):
    return obj(sdk.Views(logits=z, extras={keys.TEACHER: (v,)}),
               sdk.Batch(targets=y) if y is not None else None)


@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.9), (1.0, 0.5), (2.5, 0.0)])
def test_matches_loop(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v, y = 3 * torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 2, 1, 1])
    got = run(sdk.create("objective", "knowledge_distillation", temperature=temperature, alpha=alpha), z, v, y)
    want = slow(z, v, y, temperature, alpha)
    assert torch.allclose(got.per_sample, want, rtol=1e-10)
    g1, g2 = (torch.autograd.grad(t.sum(), z)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-9)
    if alpha == 0:
        assert got.value.item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-12)


def test_high_temperature_gradient_is_logit_matching():
    # Hinton et al. Sec. 2.1: for zero-mean logits and T >> |z|, dL/dz = (z - v) / C; the T^2
    # factor makes it independent of T
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64)
    z, v = (z - z.mean(1, keepdim=True)).requires_grad_(), v - v.mean(1, keepdim=True)
    obj = sdk.create("objective", "knowledge_distillation", temperature=1e4, alpha=1.0)
    grad = torch.autograd.grad(run(obj, z, v).per_sample.sum(), z)[0]
    assert torch.allclose(grad, (z - v).detach() / 6, atol=2e-4)


def test_alpha_one_needs_no_targets_and_zero_at_the_teacher():
    obj = sdk.create("objective", "knowledge_distillation", alpha=1.0)
    v = torch.randn(4, 3)
    assert run(obj, v.clone(), v).value.abs().item() < 1e-6
    with pytest.raises(sdk.RequirementError, match="needs Batch.targets"):
        run(sdk.create("objective", "knowledge_distillation"), v, v)


def test_errors():
    obj = sdk.create("objective", "knowledge_distillation")
    with pytest.raises(sdk.ShapeError, match=r"teacher logits\) has shape \[4, 2\], but Views.logits has \[4, 3\]"):
        run(obj, torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(sdk.RequirementError, match="needs extras\\['teacher'\\]"):
        obj(sdk.Views(logits=torch.zeros(4, 3)), sdk.Batch(targets=torch.zeros(4, dtype=torch.long)))


def test_student_learns_the_frozen_teacher_through_the_trainer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    torch.manual_seed(0)
    teacher_net = torch.nn.Linear(6, 4)
    y = teacher_net(x).argmax(1)
    student = torch.nn.Linear(6, 4)
    teacher = FrozenTeacher(teacher_net)

    def kl():
        with torch.no_grad():
            return F.kl_div(student(x).log_softmax(1), teacher_net(x).log_softmax(1),
                            log_target=True, reduction="batchmean").item()

    before = kl()
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, y), batch_size=32)
    sdk.Trainer(student, sdk.create("objective", "knowledge_distillation", alpha=1.0, temperature=1.0),
                functools.partial(torch.optim.Adam, lr=0.05), teacher=teacher, max_steps=200,
                progress=False, device="cpu").fit(loader)
    assert kl() < 0.1 * before
    assert all(not p.requires_grad for p in teacher_net.parameters())


def test_defaults_and_the_teacher_gets_no_gradient():
    obj = sdk.create("objective", "knowledge_distillation")
    assert (obj.temperature, obj.alpha) == (4.0, 0.9)
    z, v = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    run(obj, z, v, torch.tensor([0, 1, 2, 0])).value.backward()
    assert v.grad is None and z.grad.abs().sum() > 0


def test_frozen_teacher_stays_in_eval_mode():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    teacher = FrozenTeacher(net).train()
    x = torch.randn(8, 4)
    assert not net.training and torch.equal(teacher(x), teacher(x))
    teacher.update(student=torch.nn.Linear(4, 4))
    assert torch.equal(teacher(x), net(x))
