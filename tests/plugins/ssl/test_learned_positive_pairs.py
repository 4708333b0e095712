"""Hydra / SimLAP (learned_positive_pairs) against explicit loops and its reductions."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.ssl.learned_positive_pairs import filtered_pair_loss


def slow_sums(a, k, gate, y, c, ky, scale, alpha):
    """Per anchor: sum_{p: ky_p = c_i} -log(e^{l_ip} / (e^{l_ip} + sum_{n: ky_n not in {y_i, c_i}}
    e^{l_in})), l_ij = scale * sum_d g_id^2 a_id k_jd / (|a_i| |k_j|) - alpha cos(a_i, k_j)."""
    out, counts = [], []
    for i in range(a.shape[0]):
        na = torch.sqrt(sum(a[i, d] ** 2 for d in range(a.shape[1])))
        logit = []
        for j in range(k.shape[0]):
            nk = torch.sqrt(sum(k[j, d] ** 2 for d in range(k.shape[1])))
            dot = sum(gate[i, d] ** 2 * a[i, d] * k[j, d] for d in range(a.shape[1]))
            cos = sum(a[i, d] * k[j, d] for d in range(a.shape[1])) / (na * nk)
            logit.append(scale * dot / (na * nk) - alpha * cos)
        negatives = [j for j in range(k.shape[0]) if int(ky[j]) not in (int(y[i]), int(c[i]))]
        total, count = 0, 0
        for p in range(k.shape[0]):
            if int(ky[p]) != int(c[i]):
                continue
            den = torch.exp(logit[p]) + sum(torch.exp(logit[n]) for n in negatives)
            total = total - torch.log(torch.exp(logit[p]) / den)
            count += 1
        out.append(total)
        counts.append(count)
    return out, counts


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_filtered_pair_loss_value_and_gradients_match_loops(alpha):
    a, k, gate_logits = leaves((5, 4), (7, 4), (5, 4))
    gate = gate_logits.sigmoid()
    y = torch.tensor([0, 1, 2, 1, 0])
    c = torch.tensor([1, 1, 0, 2, 2])
    ky = torch.tensor([0, 1, 2, 1, 0, 2, 3])
    total, count = filtered_pair_loss(a, k, gate, y, c, ky, scale=5.0, alpha=alpha)
    want, want_count = slow_sums(a, k, gate, y, c, ky, 5.0, alpha)
    assert count.tolist() == want_count
    assert torch.allclose(total, torch.stack(want), atol=1e-10)
    got = torch.autograd.grad(total.sum(), [a, k, gate_logits], retain_graph=True)
    expected = torch.autograd.grad(sum(want), [a, k, gate_logits])
    for x, e in zip(got, expected):
        assert torch.allclose(x, e, atol=1e-10)


def test_all_ones_filter_with_identical_distinct_classes_is_cross_view_infonce():
    a, k = leaves((6, 5), (6, 5), seed=1)
    ids = torch.arange(6)
    total, count = filtered_pair_loss(a, k, torch.ones(6, 5, dtype=torch.float64), ids, ids, ids,
                                      scale=1 / 0.1)
    base = F.cross_entropy(F.normalize(a, dim=1) @ F.normalize(k, dim=1).T / 0.1, ids)
    assert torch.equal(count, torch.ones(6, dtype=torch.long))
    assert total.mean().item() == pytest.approx(base.item(), rel=1e-12)


def test_objective_averages_pairs_over_the_batch_and_both_directions():
    obj = sdk.create("objective", "learned_positive_pairs", num_classes=4, pairing="identical",
                     temperature=0.2, in_dim=6, mlp_dim=8).double().eval()
    z1, z2 = leaves((6, 3), (6, 3), seed=2)
    y = torch.tensor([0, 1, 1, 2, 3, 1])
    loss = obj(sdk.Views(embeddings=(z1, z2)), sdk.Batch(targets=y))
    gate = obj.gate(y, y, 3)
    scale = obj.log_scale.exp()  # 1 / temperature, learned
    assert scale.item() == pytest.approx(1 / 0.2)
    s1, n1 = slow_sums(z1, z2, gate, y, y, y, scale, 0.0)
    s2, n2 = slow_sums(z2, z1, gate, y, y, y, scale, 0.0)
    want = (sum(s1) + sum(s2)) / (sum(n1) + sum(n2))
    assert loss.value.item() == pytest.approx(want.item(), rel=1e-10)
    grads = torch.autograd.grad(loss.value, [z1, z2, obj.log_scale], retain_graph=True)
    expected = torch.autograd.grad(want, [z1, z2, obj.log_scale])
    for x, e in zip(grads, expected):
        assert torch.allclose(x, e, atol=1e-10)
    per = (torch.stack(s1) / torch.tensor(n1) + torch.stack(s2) / torch.tensor(n2)) / 2
    assert torch.allclose(loss.per_sample, per.detach())
    assert grads[2] != 0  # the logit scale is learned
    gate_grads = torch.autograd.grad(loss.value, obj.gate.embedding.weight)[0]
    assert gate_grads.abs().sum() > 0  # and so is the filter


def test_gate_is_a_symmetric_function_of_the_class_pair_in_the_unit_interval():
    obj = sdk.create("objective", "learned_positive_pairs", num_classes=5, in_dim=4,
                     mlp_dim=6).eval()
    first, second = torch.tensor([0, 1, 2, 4]), torch.tensor([3, 1, 0, 2])
    g = obj.gate(first, second, 7)
    assert torch.allclose(g, obj.gate(second, first, 7))
    assert g.shape == (4, 7) and bool(((g > 0) & (g < 1)).all())
    assert not torch.allclose(g[0], g[2])


def test_pairings_draw_the_positive_class_as_the_paper_and_code_do():
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    arbitrary = sdk.create("objective", "learned_positive_pairs", num_classes=5)
    torch.manual_seed(0)
    c = arbitrary.positive_classes(y)
    assert sorted(c.tolist()) == sorted(y.tolist()) and not torch.equal(c, y)  # a batch member's
    distinct = sdk.create("objective", "learned_positive_pairs", num_classes=5, pairing="distinct")
    c = distinct.positive_classes(y.repeat(50))
    assert bool((c != y.repeat(50)).all()) and set(c.tolist()) == set(range(5))
    identical = sdk.create("objective", "learned_positive_pairs", pairing="identical")
    assert torch.equal(identical.positive_classes(y), y)


def test_defaults_and_errors():
    obj = sdk.create("objective", "learned_positive_pairs")
    assert obj.log_scale.item() == pytest.approx(math.log(10.0))
    assert obj.pairing == "arbitrary" and obj.alpha == 0.0 and obj.num_classes == 1000
    z = torch.randn(4, 3)
    with pytest.raises(sdk.ShapeError, match="Batch.targets"):
        obj(sdk.Views(embeddings=(z, z)), sdk.Batch(targets=torch.tensor([0, 1, 1000, 2])))
    with pytest.raises(sdk.ShapeError, match="at least 2 anchors"):
        obj(sdk.Views(embeddings=(z[:1], z[:1])), sdk.Batch(targets=torch.tensor([0])))
    fixed = sdk.create("objective", "learned_positive_pairs", learn_temperature=False)
    assert "log_scale" not in dict(fixed.named_parameters())
