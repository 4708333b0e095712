"""future_ema_teacher: a Trainer with it ends where a hand-written FST-D loop ends (student and
teacher, with and without the optimizer's state restored), far from the plain EMA teacher; K =
0 is the plain EMA teacher, bitwise; the run resumes exactly; the defaults are the authors'."""

import copy
import functools

import pytest
import torch

import sdk
from sdk import keys
from sdk.data import IndexedDataset
from sdk.interfaces import Objective
from sdk.momentum import EMATeacher
from sdk.testing import check_resume
from sdk.types import Loss

X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
Y = torch.arange(64) % 3


class Regress(Objective):
    """The student regresses the teacher's output on each view, plus a term of its own (so the
    targets are not the student itself): mean ||z - t||^2 + 0.1 mean z^2 over the views."""

    requires = {"views": 1, "extras": (keys.TEACHER,)}
    batch_coupled = False

    def forward(self, views, batch):
        t = views.extras[keys.TEACHER]
        per = sum(((z - tv.detach()) ** 2).sum(1) + 0.1 * (z ** 2).sum(1)
                  for z, tv in zip(views.embeddings, t))
        return Loss(value=per.mean(), per_sample=per)


def loss_fn(enc, teacher, x):
    return Regress()(sdk.Views(embeddings=(enc(x),), extras={keys.TEACHER: (teacher(x),)}),
                     sdk.Batch()).value


def model():
    torch.manual_seed(1)
    return sdk.create("encoder", "mlp", in_dim=6, out_dim=3, hidden_dims=(16,))


def train(encoder, teacher, steps=6, **kwargs):
    loader = torch.utils.data.DataLoader(IndexedDataset(X, Y), batch_size=16)  # in order
    sdk.Trainer(encoder, Regress(), functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9),
                teacher=teacher, max_steps=steps, progress=False, device="cpu", **kwargs).fit(loader)
    return encoder, teacher


def hand_written_fst(encoder, k, m, steps=6, restore_optimizer=True):
    """FST-D as the module docstring writes it, in plain torch."""
    teacher = copy.deepcopy(encoder).requires_grad_(False)
    params = list(encoder.parameters())
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)

    def ema():
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), params):
                t.mul_(m).add_(s, alpha=1 - m)

    def grad(x):
        opt.zero_grad()
        loss_fn(encoder, teacher, x).backward()

    for step in range(steps):
        rows = slice(16 * (step % 4), 16 * (step % 4) + 16)
        x = X[rows]
        grad(x)
        weights = [p.detach().clone() for p in params]
        state = copy.deepcopy(opt.state_dict())
        for j in range(k):
            opt.step()
            ema()
            if j + 1 < k:
                grad(x)
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        if restore_optimizer:
            opt.load_state_dict(state)
        grad(x)
        opt.step()
        ema()
    return encoder, teacher


@pytest.mark.parametrize("restore", [True, False])
def test_equals_a_hand_written_fst_loop_and_differs_from_the_plain_teacher(restore):
    start = model()
    fst = sdk.create("teacher", "future_ema_teacher", momentum=0.9, final_momentum=0.9,
                     restore_optimizer=restore)
    enc, teacher = train(copy.deepcopy(start), fst)
    ref_enc, ref_teacher = hand_written_fst(copy.deepcopy(start), k=3, m=0.9,
                                            restore_optimizer=restore)
    for a, b in zip(enc.parameters(), ref_enc.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(teacher.target.parameters(), ref_teacher.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    plain, _ = train(copy.deepcopy(start), sdk.create("teacher", "ema", momentum=0.9,
                                                      final_momentum=0.9))
    gap = max(float((a - c).detach().abs().max()) for a, c in zip(enc.parameters(), plain.parameters()))
    assert gap > 1e-3


def test_the_optimizer_state_is_restored_or_kept_as_the_authors_code():
    start = model()
    kept = train(copy.deepcopy(start), sdk.create("teacher", "future_ema_teacher", momentum=0.9,
                                                  final_momentum=0.9, restore_optimizer=False))[0]
    restored = train(copy.deepcopy(start), sdk.create("teacher", "future_ema_teacher",
                                                      momentum=0.9, final_momentum=0.9))[0]
    gap = max(float((a - c).detach().abs().max()) for a, c in zip(kept.parameters(), restored.parameters()))
    assert gap > 1e-4


def test_zero_steps_ahead_is_the_plain_ema_teacher_bitwise():
    start = model()
    fst = train(copy.deepcopy(start), sdk.create("teacher", "future_ema_teacher", steps=0))
    plain = train(copy.deepcopy(start), sdk.create("teacher", "ema", momentum=0.999,
                                                   final_momentum=0.999))
    for a, b in zip([*fst[0].parameters(), *fst[1].target.parameters()],
                    [*plain[0].parameters(), *plain[1].target.parameters()]):
        assert torch.equal(a, b)


def test_defaults_are_the_authors_and_bad_settings_are_named():
    t = sdk.create("teacher", "future_ema_teacher")
    assert isinstance(t, EMATeacher)
    assert (t.steps, t.momentum, t.final_momentum, t.restore_optimizer) == (3, 0.999, 0.999, True)
    with pytest.raises(sdk.ConfigError, match="future_ema_teacher: steps must be >= 0"):
        sdk.create("teacher", "future_ema_teacher", steps=-1)
    with pytest.raises(sdk.ConfigError, match="future_ema_teacher.*accumulate=1"):
        train(model(), sdk.create("teacher", "future_ema_teacher"), accumulate=2)


def test_engine_checkpoints_the_teacher_and_resume_continues_it(tmp_path):
    check_resume(objective=Regress,
                 teacher=lambda: sdk.create("teacher", "future_ema_teacher", momentum=0.9,
                                            final_momentum=0.9),
                 tmp_dir=tmp_path)
