"""fixmatch against a written-out loop (value and gradient), the >= of its threshold, no gradient
through the pseudo-label, the mean over all unlabelled rows; FlexMatch's curriculum thresholds
against a counter-based loop; kill-and-resume of a semi-supervised run, bit for bit."""

import math
from collections import Counter

import pytest
import torch

import sdk
from sdk import keys
from sdk.errors import RequirementError, ShapeError
from sdk.testing import check_resume


def inputs(b=4, u=12, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    weak = torch.randn(u, c, generator=g, dtype=torch.float64) * torch.linspace(0.5, 9, u,
                                                                                 dtype=torch.float64)[:, None]
    strong = torch.randn(u, c, generator=g, dtype=torch.float64)
    return logits, y, weak, strong


def call(obj, logits, y, weak, strong, index=None):
    extras = {keys.UNLABELED: (weak, strong)}
    if index is not None:
        extras[keys.UNLABELED_INDEX] = index
    return obj(sdk.Views(logits=logits, extras=extras), sdk.Batch(targets=y))


def slow(logits, y, weak, strong, tau, lam):
    """The paper's eq. 2-4 written out sample by sample."""
    sup = 0.0
    for i in range(logits.shape[0]):
        sup = sup - (logits[i, y[i]] - torch.log(sum(torch.exp(v) for v in logits[i])))
    sup = sup / logits.shape[0]
    uns = 0.0
    for i in range(weak.shape[0]):
        w = [float(v) for v in weak[i].detach()]
        top = max(w)
        denom = sum(math.exp(v - top) for v in w)
        q = max(range(len(w)), key=lambda k: w[k])
        if 1.0 / denom >= tau:  # the confidence of the arg-max
            uns = uns - (strong[i, q] - torch.log(sum(torch.exp(v) for v in strong[i])))
    return sup + lam * uns / weak.shape[0]  # averaged over all mu B unlabelled rows


@pytest.mark.parametrize("tau, lam", [(0.95, 1.0), (0.6, 2.5)])
def test_matches_the_written_out_loss_value_and_gradient(tau, lam):
    logits, y, weak, strong = inputs()
    obj = sdk.create("objective", "fixmatch", threshold=tau, unlabeled_weight=lam)
    leaves = [t.clone().requires_grad_() for t in (logits, weak, strong)]
    loss = call(obj, leaves[0], y, leaves[1], leaves[2])
    kept = float(loss.logs["mask_rate"])
    assert 0 < kept < 1  # some rows kept, some not: the mean's denominator matters
    got = torch.autograd.grad(loss.value, leaves, allow_unused=True)
    ref = [t.clone().requires_grad_() for t in (logits, weak, strong)]
    want_value = slow(ref[0], y, ref[1], ref[2], tau, lam)
    want = torch.autograd.grad(want_value, [ref[0], ref[2]])
    assert loss.value.item() == pytest.approx(want_value.item(), rel=1e-12)
    assert torch.allclose(got[0], want[0], rtol=1e-10) and torch.allclose(got[2], want[1], rtol=1e-10)
    assert got[1] is None or not got[1].any()  # no gradient through the pseudo-label


def test_confidence_equal_to_the_threshold_counts():
    weak = torch.zeros(3, 2, dtype=torch.float64)  # confidence exactly 0.5
    weak[2] = torch.tensor([0.0, -3.0])
    strong = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits, y = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([0, 1])
    loss = call(sdk.create("objective", "fixmatch", threshold=0.5), logits, y, weak, strong)
    assert loss.logs["mask_rate"].item() == 1.0
    above = call(sdk.create("objective", "fixmatch", threshold=0.5 + 1e-9), logits, y, weak, strong)
    assert above.logs["mask_rate"].item() == pytest.approx(1 / 3)


def test_without_unlabelled_views_is_the_labelled_cross_entropy():
    logits, y, _, _ = inputs()
    value = sdk.create("objective", "fixmatch")(sdk.Views(logits=logits), sdk.Batch(targets=y)).value
    assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-12)


def test_bad_unlabelled_inputs_name_the_plugin_and_field():
    logits, y, weak, strong = inputs()
    obj = sdk.create("objective", "fixmatch")
    with pytest.raises(RequirementError, match="fixmatch.*2 unlabelled views"):
        obj(sdk.Views(logits=logits, extras={keys.UNLABELED: (weak,)}), sdk.Batch(targets=y))
    with pytest.raises(ShapeError, match="fixmatch.*unlabeled.*4 classes"):
        call(obj, logits, y, weak[:, :4], strong[:, :4])
    with pytest.raises(ShapeError, match="fixmatch.*differ in shape"):
        call(obj, logits, y, weak, strong[:5])
    curriculum = sdk.create("objective", "fixmatch", curriculum=True, num_classes=5, num_samples=12)
    with pytest.raises(RequirementError, match="fixmatch.*unlabeled_index"):
        call(curriculum, logits, y, weak, strong)
    with pytest.raises(ShapeError, match="fixmatch.*unlabeled_index.*\\[0, 12\\)"):
        call(curriculum, logits, y, weak, strong, torch.arange(12) + 1)
    with pytest.raises(sdk.ConfigError, match="num_samples"):
        sdk.create("objective", "fixmatch", curriculum=True)


def test_class_thresholds_apply_per_pseudo_label():
    logits, y, weak, strong = inputs()
    taus = (0.99, 0.2, 0.99, 0.2, 0.99)
    conf, q = weak.softmax(-1).max(-1)
    loss = call(sdk.create("objective", "fixmatch", class_thresholds=taus), logits, y, weak, strong)
    want = (conf >= torch.tensor(taus, dtype=torch.float64)[q]).double().mean()
    assert loss.logs["mask_rate"].item() == pytest.approx(want.item())


def slow_flexmatch_thresholds(selected, num_classes, tau):
    """FlexMatch with threshold warm-up: beta_c = sigma_c / max(counts incl. the unused), the
    convex mapping M(x) = x / (2 - x)."""
    counter = Counter(selected)
    top = max(counter.values())
    return [tau * (counter[c] / top) / (2 - counter[c] / top) for c in range(num_classes)]


def test_curriculum_thresholds_follow_flexmatch_and_key_state_by_index():
    n, c, tau = 20, 5, 0.7
    obj = sdk.create("objective", "fixmatch", threshold=tau, curriculum=True, num_classes=c,
                     num_samples=n)
    selected = [-1] * n
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        logits, y, weak, strong = inputs(u=8, seed=step)
        index = torch.randperm(n, generator=g)[:8]
        conf, q = weak.softmax(-1).max(-1)
        taus = slow_flexmatch_thresholds(selected, c, tau)
        assert obj.threshold(torch.arange(c), None).tolist() == pytest.approx(taus, rel=1e-12)
        want = sum(float(conf[i]) >= taus[int(q[i])] for i in range(8)) / 8
        loss = call(obj, logits, y, weak, strong, index)
        assert loss.logs["mask_rate"].item() == pytest.approx(want)
        for i in range(8):  # then the confident predictions are recorded by dataset index
            if float(conf[i]) >= tau:
                selected[int(index[i])] = int(q[i])
        assert obj.state_dict()["threshold.selected"].tolist() == selected
    obj.eval()  # evaluation leaves the state
    call(obj, *inputs(u=8, seed=9)[:4], torch.arange(8))
    assert obj.state_dict()["threshold.selected"].tolist() == selected


@pytest.mark.parametrize("params", [{}, {"curriculum": True, "num_classes": 4, "num_samples": 140,
                                         "threshold": 0.3}])
def test_semi_supervised_run_resumes_bit_for_bit(tmp_path, params):
    runs = check_resume(objective=lambda: sdk.create("objective", "fixmatch", **params),
                        tmp_dir=tmp_path, mu=7)
    assert runs.straight._unlabeled.position == runs.resumed._unlabeled.position
    if params:  # the per-sample state was used and is part of what matched
        assert (runs.resumed.objective.threshold.selected >= 0).any()


def test_defaults_are_the_papers():
    obj = sdk.create("objective", "fixmatch")
    assert (obj.tau, obj.unlabeled_weight) == (0.95, 1.0)
    assert type(obj.threshold).__name__ == "FixedThreshold"
