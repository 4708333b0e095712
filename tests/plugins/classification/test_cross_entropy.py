"""cross_entropy against the written-out formula, with label smoothing and soft targets."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk


def slow(logits, targets, eps):
    total = []
    for z, y in zip(logits.tolist(), targets.tolist()):
        c = len(z)
        lse = math.log(sum(math.exp(v) for v in z))
        q = [(1 - eps) * (1.0 if k == y else 0.0) + eps / c for k in range(c)]
        total.append(-sum(qk * (zk - lse) for qk, zk in zip(q, z)))
    return total


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_formula(eps):
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g), torch.tensor([0, 3, 1, 1, 2, 0])
    loss = sdk.create("objective", "cross_entropy", label_smoothing=eps)(
        sdk.Views(logits=logits), sdk.Batch(targets=y))
    expected = slow(logits, y, eps)
    assert loss.per_sample.tolist() == pytest.approx(expected, rel=1e-5)
    assert loss.value.item() == pytest.approx(sum(expected) / 6, rel=1e-5)


def test_soft_targets_are_linear():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=g)
    a, b = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 0, 1, 0])
    soft = 0.3 * torch.nn.functional.one_hot(a, 3) + 0.7 * torch.nn.functional.one_hot(b, 3)
    ce = sdk.create("objective", "cross_entropy")
    mixed = ce(sdk.Views(logits=logits), sdk.Batch(targets=soft.float())).per_sample
    parts = (0.3 * ce(sdk.Views(logits=logits), sdk.Batch(targets=a)).per_sample
             + 0.7 * ce(sdk.Views(logits=logits), sdk.Batch(targets=b)).per_sample)
    assert torch.allclose(mixed, parts, atol=1e-6)


def test_errors():
    with pytest.raises(sdk.ConfigError, match="label_smoothing must be in"):
        sdk.create("objective", "cross_entropy", label_smoothing=1.0)
    with pytest.raises(sdk.ShapeError, match=r"soft labels \[4, 3\] matching the logits, got \[4, 2\]"):
        sdk.create("objective", "cross_entropy")(sdk.Views(logits=torch.zeros(4, 3)),
                                                  sdk.Batch(targets=torch.zeros(4, 2)))
    with pytest.raises(sdk.RequirementError, match="needs Views.logits"):
        sdk.create("objective", "cross_entropy")(sdk.Views(embeddings=(torch.zeros(4, 3),)),
                                                  sdk.Batch(targets=torch.zeros(4, dtype=torch.long)))


def test_ids_of_any_integer_dtype_and_errors_found_after_torch_fails():
    """int64 ids go to torch's kernel unchecked; ids of other integer dtypes are converted (torch
    takes only int64 and uint8), and ids torch refuses are checked to say why."""
    from plugins.classification.cross_entropy import cross_entropy_loss

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 1, 2, 2, 0])
    reference = F.cross_entropy(logits, y)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(cross_entropy_loss(logits, y.to(dtype), reduction="mean"), reference)
    with pytest.raises(sdk.ShapeError, match="must lie in"):
        cross_entropy_loss(logits, torch.tensor([0, 1, 2, 3, 4, 0]), reduction="mean")
    with pytest.raises(sdk.ShapeError, match="soft labels must be floating point"):
        cross_entropy_loss(logits, torch.zeros(6, 4, dtype=torch.long), reduction="mean")
    with pytest.raises(sdk.ShapeError, match="must be integer ids"):
        cross_entropy_loss(logits, torch.zeros(6, dtype=torch.bool), reduction="mean")


def test_class_weights_and_ignore_index_reduce_as_torch():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(8, 3, generator=g), torch.tensor([0, 2, -1, 1, 1, -1, 2, 0])
    w = (0.5, 2.0, 1.0)
    loss = sdk.create("objective", "cross_entropy", class_weights=w, ignore_index=-1)(
        sdk.Views(logits=logits), sdk.Batch(targets=y))
    want = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor(w), ignore_index=-1)
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-6)
    assert loss.per_sample[2] == 0 and loss.per_sample[5] == 0
    plain = sdk.create("objective", "cross_entropy", ignore_index=-1)(sdk.Views(logits=logits),
                                                                        sdk.Batch(targets=y))
    assert plain.value.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, ignore_index=-1).item(), rel=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"class_weights": (1.0, 2.0, 0.5, 1.0, 3.0)},
                                    {"ignore_index": 2, "label_smoothing": 0.1},
                                    {"class_weights": (1.0, 2.0, 0.5, 1.0, 3.0), "ignore_index": 2}])
def test_fused_mean_equals_the_mean_of_per_sample_losses(kwargs):
    """Without a reader of per-sample losses (the Trainer's request) the value is torch's fused
    mean, equal in value and gradient to the reduced per-sample losses."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (16,), generator=g)
    y[3] = 2
    obj = sdk.create("objective", "cross_entropy", **kwargs)
    full = obj(sdk.Views(logits=z, embeddings=(z,)), sdk.Batch(targets=y))
    obj.request_per_sample(False)
    fused = obj(sdk.Views(logits=z, embeddings=(z,)), sdk.Batch(targets=y))
    assert full.per_sample is not None and fused.per_sample is None
    torch.testing.assert_close(fused.value.double(), full.value.double(), rtol=1e-6, atol=1e-7)
    g_full, = torch.autograd.grad(full.value, z)
    g_fused, = torch.autograd.grad(fused.value, z)
    torch.testing.assert_close(g_fused.double(), g_full.double(), rtol=1e-5, atol=1e-7)
