"""feature_distillation (KD-Loss) against a per-coordinate loop (value and gradient), the
gradients of its regions worked out by hand, its indifference to the teachers' side of the
ground truth, and training through the Trainer with two frozen teachers."""

import functools

import pytest
import torch

import sdk
from sdk import keys
from sdk.classification import FrozenTeacher

A = dict(at=1.9, amt=-0.45, al=1.8, aml=-0.4, wm=2.0, wt=1.0, wl=1.0)


def sign(v):
    return (v > 0) - (v < 0)


def slow(p, y, tough, tol, a=A):
    rows = []
    for i in range(p.shape[0]):
        total = torch.zeros((), dtype=p.dtype)
        for k in range(p.shape[1]):
            pi, yi = p[i, k], float(y[i, k])
            pf = float(pi.detach())
            s = sign(pf - yi)
            terms = []
            for teacher, alpha, alpha_minus, weight in ((float(tough[i, k]), a["at"], a["amt"], a["wt"]),
                                                        (float(tol[i, k]), a["al"], a["aml"], a["wl"])):
                r = yi + s * abs(teacher - yi)
                band = yi + 0.15 * s * abs(teacher - yi)
                w = 0.0
                if sign(pf - r) * sign(r - yi) > 0:
                    w += alpha
                if sign(r - pf) * sign(pf - band) >= 0:
                    w += alpha_minus
                terms.append(weight * w * torch.abs(r - pi))
            e, d = torch.abs(yi - pi), abs(yi - float(tol[i, k]))
            main = 3 * e if abs(yi - pf) <= d else e ** 2 + 3 * d - d ** 2
            total = total + a["wm"] * main + terms[0] + terms[1]
        rows.append(total / p.shape[1])
    return torch.stack(rows)


def run(obj, p, y, tough, tol):
    return obj(sdk.Views(embeddings=(p,), extras={keys.TEACHER: (torch.cat([tough, tol], 1),)}),
               sdk.Batch(targets=y))


def test_matches_loop_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 5, generator=g, dtype=torch.float64)
    tough = y + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    tol = y + 0.6 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    p = (y + torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
    got = run(sdk.create("objective", "feature_distillation"), p, y, tough, tol)
    want = slow(p, y, tough, tol)
    assert torch.allclose(got.per_sample, want, rtol=1e-12)
    g1, g2 = (torch.autograd.grad(t.sum(), p)[0] for t in (got.per_sample, want))
    assert torch.allclose(g1, g2, rtol=1e-12)


@pytest.mark.parametrize(("pred", "grad"), [
    (2.0, 2 * 2 * 2.0 + 1.9 + 1.8),  # beyond both teachers: quadratic main term, both pull back
    (0.6, 2 * 2 * 0.6 + 0.45 + 1.8),  # between the band and Tough (pushed to y), beyond Tolerant
    (0.3, 2 * 3 + 0.45 + 0.4),  # inside both: linear main term, both push towards y
    (0.05, 2 * 3),  # inside both bands: the main term only
    (-0.6, -(2 * 2 * 0.6 + 0.45 + 1.8)),  # the teachers are reflected to the student's side
])
def test_region_gradients_by_hand(pred, grad):
    y, tough, tol = (torch.tensor([[v]], dtype=torch.float64) for v in (0.0, 1.0, 0.5))
    p = torch.tensor([[pred]], dtype=torch.float64, requires_grad=True)
    loss = run(sdk.create("objective", "feature_distillation"), p, y, tough, tol).value
    assert torch.autograd.grad(loss, p)[0].item() == pytest.approx(grad, rel=1e-12)


def test_zero_at_the_ground_truth_and_indifferent_to_the_teachers_side():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    tough, tol = (y + torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    obj = sdk.create("objective", "feature_distillation")
    assert run(obj, y.clone(), y, tough, tol).value.item() == 0
    p = y + torch.randn(4, 3, generator=g, dtype=torch.float64)
    base = run(obj, p, y, tough, tol).per_sample
    assert torch.allclose(run(obj, p, y, 2 * y - tough, 2 * y - tol).per_sample, base, rtol=1e-12)
    assert not torch.allclose(run(obj, p, y, 0.5 * (tough + y), tol).per_sample, base)


def test_student_learns_with_two_frozen_teachers_through_the_trainer():
    from plugins.classification.feature_distillation import TwoTeachers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    y = x @ w
    torch.manual_seed(0)
    tough, tol = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    with torch.no_grad():  # a close teacher and a looser one
        tough.weight.copy_(w.T + 0.05 * torch.randn(3, 5)), tough.bias.zero_()
        tol.weight.copy_(w.T + 0.2 * torch.randn(3, 5)), tol.bias.zero_()
    student = torch.nn.Linear(5, 3)
    error = lambda: (student(x) - y).abs().mean().item()  # noqa: E731
    before = error()
    loader = torch.utils.data.DataLoader(sdk.data.IndexedDataset(x, y), batch_size=64)
    sdk.Trainer(student, sdk.create("objective", "feature_distillation"),
                functools.partial(torch.optim.Adam, lr=0.03), teacher=FrozenTeacher(TwoTeachers(tough, tol)),
                max_steps=80, progress=False, device="cpu").fit(loader)
    assert error() < 0.1 * before


def test_errors():
    obj = sdk.create("objective", "feature_distillation")
    y = torch.zeros(3, 2)
    with pytest.raises(sdk.ShapeError, match=r"feature_distillation: Batch.targets must be real values"):
        run(obj, torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), y, y)
    with pytest.raises(sdk.ShapeError, match=r"feature_distillation: Views.extras\['teacher'\] .* \[3, 4\], got \[3, 3\]"):
        obj(sdk.Views(embeddings=(torch.zeros(3, 2),), extras={keys.TEACHER: (torch.zeros(3, 3),)}),
            sdk.Batch(targets=y))
