"""sdk.classification: target checks name plugin and field, reductions as torch's, stable
log-softmax in bfloat16, distillation KL."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdk import classification as cls
from sdk import keys
from sdk.errors import ConfigError, ShapeError
from sdk.types import Views


def test_ids_are_checked_on_cpu_and_ignored_ids_are_masked():
    z = torch.zeros(3, 4)
    t = cls.targets("toy", z, torch.tensor([0, 3, 1]))
    assert t.kind == "ids" and t.valid is None and t.ids.tolist() == [0, 3, 1]
    with pytest.raises(ShapeError, match=r"toy: Batch.targets must lie in \[0, 4\), got ids in \[0, 4\]"):
        cls.targets("toy", z, torch.tensor([0, 4, 1]))
    with pytest.raises(ShapeError, match=r"toy: Batch.targets must lie in \[0, 4\), got ids in \[-1, 1\]"):
        cls.targets("toy", z, torch.tensor([0, -1, 1]))
    t = cls.targets("toy", z, torch.tensor([0, -100, 1]), ignore_index=-100)
    assert t.ids.tolist() == [0, 0, 1] and t.valid.tolist() == [True, False, True]
    with pytest.raises(ShapeError, match=r"toy: Batch.targets must be integer ids \[B\], got torch.float32"):
        cls.targets("toy", z, torch.tensor([0.0, 1.0, 2.0]))


def test_dense_targets():
    z = torch.zeros(2, 3, dtype=torch.bfloat16)
    soft = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    t = cls.targets("toy", z, soft)
    assert t.kind == "soft" and t.dense.dtype == torch.float32  # bf16 rows sum to 1 within its eps
    with pytest.raises(ShapeError, match="toy: Batch.targets as soft labels must sum to 1 per row, "
                       "got row sums in \\[0.9, 1\\]"):
        cls.targets("toy", z.float(), torch.tensor([[0.2, 0.2, 0.5], [1.0, 0.0, 0.0]]))
    with pytest.raises(ShapeError, match=r"soft labels must lie in \[0, 1\], got values in \[-0.5"):
        cls.targets("toy", z.float(), torch.tensor([[-0.5, 0.5, 1.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ShapeError, match=r"soft labels \[2, 3\] matching the logits, got \[2, 4\]"):
        cls.targets("toy", z, torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"toy: Batch.targets must be class ids \[2\]"):
        cls.targets("toy", z, soft, soft=False)
    sets = cls.targets("toy", z, torch.tensor([[1, 1, 0], [0, 0, 0]]), multilabel=True)
    assert sets.kind == "multilabel" and sets.dense.sum().item() == 2
    with pytest.raises(ConfigError, match="toy: ignore_index applies to class-id targets"):
        cls.targets("toy", z, soft, ignore_index=-1)


def test_reduce_is_torch_cross_entropy_reduction():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.tensor([0, 2, 5, 1, 1, 5, 2])
    w = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    t = cls.targets("toy", z, y, ignore_index=5)
    loss = cls.reduce(-cls.pick(cls.log_probs(z), t), t, w)
    assert loss.value.item() == pytest.approx(F.cross_entropy(z, y, weight=w, ignore_index=5).item(), rel=1e-12)
    assert torch.allclose(loss.per_sample, F.cross_entropy(z, y, weight=w, ignore_index=5, reduction="none"))
    everything_ignored = cls.targets("toy", z, torch.full((7,), 5), ignore_index=5)
    assert cls.reduce(torch.full((7,), math.inf), everything_ignored).value.item() == 0.0
    with pytest.raises(ShapeError, match="toy: class_weights has 3 entries, but the logits have 4"):
        cls.class_weights("toy", w, 4)


def test_log_probs_in_bfloat16_are_float32_and_stable():
    z = torch.tensor([[3e4, 0.0, -3e4], [1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    out = cls.log_probs(z)
    want = torch.log_softmax(z.double(), -1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out.double(), want, rtol=1e-6)
    assert cls.log_probs(z.double()).dtype == torch.float64


def test_distillation_kl_and_teacher_logits():
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    want = 9 * F.kl_div(torch.log_softmax(z / 3, 1), torch.log_softmax(v / 3, 1), log_target=True,
                        reduction="none").sum(1)
    assert torch.allclose(cls.distillation_kl(z, v, 3.0), want, rtol=1e-12)
    views = Views(logits=z, extras={keys.TEACHER: (v.requires_grad_(),)})
    assert not cls.teacher_logits("toy", views).requires_grad
    with pytest.raises(ShapeError, match=r"toy: Views.extras\['teacher'\] must hold floating teacher logits"):
        cls.teacher_logits("toy", Views(logits=z, extras={keys.TEACHER: ("x",)}))


def test_unknown_rows_are_taken_only_when_asked_and_refused_with_the_convention_named():
    z = torch.zeros(4, 3)
    y = torch.tensor([0, cls.UNKNOWN, 2, cls.UNKNOWN])
    with pytest.raises(ShapeError, match=r"loss: Batch.targets must lie in \[0, 3\), got ids in "
                                         r"\[-1, 2\]; -1 marks a row of unknown class .* accepts_unknown"):
        cls.targets("loss", z, y)
    t = cls.targets("loss", z, y, unknown=True)
    assert t.valid.tolist() == [True, False, True, False] and t.ids.tolist() == [0, 0, 2, 0]
    with pytest.raises(ShapeError, match=r"must lie in \[0, 3\), got ids in \[-2, 2\]"):
        cls.targets("loss", z, torch.tensor([0, -2, 2, -1]), unknown=True)
    both = cls.targets("loss", z, torch.tensor([0, -1, 2, 7]), unknown=True, ignore_index=7)
    assert both.valid.tolist() == [True, False, True, False]


_SEEN: list[int] = []


def _unknown_registry(accepts):
    import sdk
    from sdk.interfaces import Objective
    from sdk.types import Loss

    class Masked(Objective):
        """Cross-entropy over the labelled rows plus the entropy of the unknown ones."""

        requires = {"logits": True, "targets": True}
        batch_coupled = False
        accepts_unknown = accepts

        def forward(self, views, batch):
            _SEEN.append(int((batch.targets == cls.UNKNOWN).sum()))
            t = cls.targets(f"objective {self.name!r}", views.logits, batch.targets, soft=False,
                            unknown=accepts)
            logp = cls.log_probs(views.logits)
            known = t.valid if t.valid is not None else torch.ones_like(t.ids, dtype=torch.bool)
            per = torch.where(known, -cls.pick(logp, t), -(logp.exp() * logp).sum(1))
            return Loss(value=per.mean(), per_sample=per)

    reg = sdk.Registry()
    reg.add(Masked, card=sdk.Card(name="toy", kind="objective", title="t", summary="s"))
    return reg


def test_the_kit_fuzzes_unknown_rows_only_for_objectives_that_accept_them():
    import sdk
    from sdk.fuzz import fuzz_plugin

    _SEEN.clear()
    fuzz_plugin("objective", "toy", registry=_unknown_registry(True), max_examples=15)
    assert sum(_SEEN) > 0  # valid batches held unknown rows
    fuzz_plugin("objective", "toy", registry=_unknown_registry(False), max_examples=15)
    # -1 is an invalid id only for objectives that do not declare accepts_unknown (-2 for those that do)
    for accepts, bad in ((False, "class id -1"), (True, "class id -2")):
        obj = _unknown_registry(accepts).create("objective", "toy")
        views, batch = sdk.testing.objective_inputs(obj, torch.Generator().manual_seed(0))
        assert (batch.targets == cls.UNKNOWN).any() == accepts
        named = [m[0] for m in sdk.fuzz._objective_mutations(obj, views, batch, torch.Generator())]
        assert any(w.startswith(bad) for w in named)
    sdk.testing.check_plugin("objective", "toy", registry=_unknown_registry(True), fuzz=0)


@pytest.mark.parametrize("c", [3, 17, 1000])
def test_in_place_softmax_kernels_equal_the_out_of_place_ones(c):
    g = torch.Generator().manual_seed(c)
    for dtype in (torch.float64, torch.float32):
        x = 5 * torch.randn(33, c, generator=g, dtype=dtype)
        grad, p = torch.randn(33, c, generator=g, dtype=dtype), torch.softmax(x, -1)
        want_lsm, want_bwd = torch.log_softmax(x, -1), p * (grad - (grad * p).sum(-1, keepdim=True))
        buf = x.clone()
        assert cls.log_softmax_(buf).data_ptr() == buf.data_ptr() and torch.equal(buf, want_lsm)
        buf = grad.clone()
        assert cls.softmax_backward_(buf, p).data_ptr() == buf.data_ptr()
        assert torch.allclose(buf, want_bwd, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)
