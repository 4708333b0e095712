"""sdk.ssl against explicit float64 loops, analytic values and the properties they claim."""

import math

import pytest
import torch

from sdk.errors import ShapeError
from sdk.ssl import (
    Center,
    Predictor,
    at_least_float32,
    batch_standardize,
    covariance_term,
    cross_correlation,
    invariance_term,
    negative_cosine,
    off_diagonal_sq_sum,
    sinkhorn,
    teacher_temperature,
    variance_term,
)


def _z(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cross_correlation_and_off_diagonal_match_loops():
    a, b = _z(9, 3), _z(9, 3, seed=1)
    n, d = a.shape

    def std(z, i, k):
        col = [float(z[r, i]) for r in range(n)]
        m = sum(col) / n
        v = sum((x - m) ** 2 for x in col) / n
        return (col[k] - m) / math.sqrt(v + 1e-5)

    c = cross_correlation(a, b)
    for i in range(d):
        for j in range(d):
            want = sum(std(a, i, k) * std(b, j, k) for k in range(n)) / n
            assert float(c[i, j]) == pytest.approx(want, rel=1e-10)
    off = sum(float(c[i, j]) ** 2 for i in range(d) for j in range(d) if i != j)
    assert float(off_diagonal_sq_sum(c)) == pytest.approx(off, rel=1e-12)
    assert batch_standardize(a).dtype == torch.float64


@pytest.mark.parametrize("n", [1, 2, 7])
def test_batch_standardize_is_the_biased_batch_standardisation_with_its_gradient(n):
    z = _z(n, 3, seed=5).requires_grad_()
    w = _z(n, 3, seed=6)
    got = batch_standardize(z, eps=1e-5)
    want = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got, = torch.autograd.grad((got * w).sum(), z)
    g_want, = torch.autograd.grad((want * w).sum(), z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def _vic_slow(z, gamma=1.0, eps=1e-4):
    n, d = z.shape
    cols = [[float(z[r, j]) for r in range(n)] for j in range(d)]
    means = [sum(c) / n for c in cols]
    var = sum(max(0.0, gamma - math.sqrt(sum((x - m) ** 2 for x in c) / (n - 1) + eps))
              for c, m in zip(cols, means)) / d
    cov = sum((sum((cols[i][r] - means[i]) * (cols[j][r] - means[j]) for r in range(n)) / (n - 1)) ** 2
              for i in range(d) for j in range(d) if i != j) / d
    return var, cov


@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_variance_and_covariance_terms_match_loops(gamma):
    z = 0.7 * _z(7, 4, seed=3)  # some standard deviations below gamma, so the hinge is active
    var, cov = _vic_slow(z, gamma)
    assert float(variance_term(z, gamma)) == pytest.approx(var, rel=1e-10)
    assert float(covariance_term(z)) == pytest.approx(cov, rel=1e-10)
    a, b = _z(5, 3), _z(5, 3, seed=2)
    want = sum((float(a[i, j]) - float(b[i, j])) ** 2 for i in range(5) for j in range(3)) / 15
    assert float(invariance_term(a, b)) == pytest.approx(want, rel=1e-12)


def test_variance_term_gradient_is_the_hinge():
    # one dimension with std 0.5 < 1 (active), one with std 2 (inactive): d v / d z only in the first
    z = torch.tensor([[0.5, 2.0], [-0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    variance_term(z, 1.0, 0.0).backward()
    assert torch.all(z.grad[:, 1] == 0)
    # v = (1 - sqrt(sum (z - m)^2 / (n - 1))) / 2; d/dz_00 = -(z_00 - m) / ((n - 1) std) / 2
    std = math.sqrt(0.5)
    assert float(z.grad[0, 0]) == pytest.approx(-0.5 / std / 2, rel=1e-10)


def _sinkhorn_slow(scores, iterations, eps):
    b, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(b)] for j in range(k)]  # [K, B]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / sum(row) / k for x in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


@pytest.mark.parametrize("iterations,eps", [(3, 0.05), (1, 0.5), (10, 0.1), (0, 0.05)])
def test_sinkhorn_matches_the_published_loop(iterations, eps):
    scores = torch.nn.functional.normalize(_z(6, 4), dim=1) @ torch.nn.functional.normalize(
        _z(5, 4, seed=1), dim=1).T
    got = sinkhorn(scores, iterations, eps)
    torch.testing.assert_close(got, _sinkhorn_slow(scores, iterations, eps), rtol=1e-9, atol=1e-12)
    if iterations:
        torch.testing.assert_close(got.sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("eps", [0.05, 0.03])
def test_sinkhorn_of_bounded_scores_takes_the_same_iterates_on_q(iterations, eps):
    scores = torch.nn.functional.normalize(_z(40, 8), dim=1) @ torch.nn.functional.normalize(
        _z(30, 8, seed=1), dim=1).T
    want = _sinkhorn_slow(scores, iterations, eps)
    torch.testing.assert_close(sinkhorn(scores, iterations, eps, bound=1.0), want, rtol=1e-10,
                               atol=1e-13)
    torch.testing.assert_close(sinkhorn(scores.float(), iterations, eps, bound=1.0).double(), want,
                               rtol=1e-5, atol=1e-7)


def test_sinkhorn_keeps_the_log_domain_where_a_bounded_q_could_underflow():
    """|s| <= 1 at eps = 0.02: exponents down to -100 (below float32's range): the log domain."""
    scores = torch.tanh(_z(16, 8, seed=3) * 5).float()
    assert torch.equal(sinkhorn(scores, eps=0.02, bound=1.0), sinkhorn(scores, eps=0.02))
    q = sinkhorn(scores, eps=0.02, bound=1.0)
    assert torch.isfinite(q).all()


def test_sinkhorn_converges_to_equipartition_and_is_safe_in_low_precision():
    scores = torch.tanh(_z(64, 8, seed=4) * 3)
    q = sinkhorn(scores, iterations=200)
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8, dtype=torch.float64), rtol=1e-6,
                               atol=1e-6)
    # scores of any scale: the max is subtracted first; bf16 inputs are computed in float32
    big = sinkhorn((100 * scores).to(torch.bfloat16), eps=0.05)
    assert big.dtype == torch.float32 and torch.isfinite(big).all()
    torch.testing.assert_close(sinkhorn(scores.float()).double(), sinkhorn(scores), rtol=1e-4, atol=1e-6)


def test_center_is_an_ema_of_batch_means_and_round_trips():
    c = Center(momentum=0.9)
    t1, t2 = _z(4, 3), _z(6, 3, seed=1)
    assert torch.equal(c(t1), t1)  # zero centre before the first update
    c.update(t1)
    c.update(t2.reshape(2, 3, 3))  # leading dimensions (views, batch) are averaged alike
    want = 0.9 * (0.1 * t1.mean(0)) + 0.1 * t2.mean(0)
    torch.testing.assert_close(c.center.double(), want.float().double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c(t2), t2 - c.center.double())
    fresh = Center(0.9)
    fresh.load_state_dict(c.state_dict())
    assert torch.equal(fresh.center, c.center)
    named = Center(owner="objective 'dino'")
    named.load_state_dict(c.state_dict())
    with pytest.raises(ShapeError, match="'dino'.*5 dimensions.*has 3"):
        named(_z(2, 5))


def test_teacher_temperature_warm_up():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(99, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(0, 0, 0.04, 0.07) == teacher_temperature(3, 10, None, 0.07) == 0.07


def test_negative_cosine_value_and_stop_gradient():
    a, b = _z(5, 3), _z(5, 3, seed=1)
    want = [-sum(float(a[i, j]) * float(b[i, j]) for j in range(3))
            / math.sqrt(sum(float(a[i, j]) ** 2 for j in range(3)))
            / math.sqrt(sum(float(b[i, j]) ** 2 for j in range(3))) for i in range(5)]
    p, z = a.requires_grad_(), b.requires_grad_()
    d = negative_cosine(p, z)
    torch.testing.assert_close(d.detach(), torch.tensor(want, dtype=torch.float64))
    d.sum().backward()
    assert z.grad is None and p.grad.abs().sum() > 0
    negative_cosine(p, z, stop_gradient=False).sum().backward()
    assert z.grad.abs().sum() > 0


def test_low_precision_is_upcast():
    assert at_least_float32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_float32(torch.ones(2, dtype=torch.float64)).dtype == torch.float64


def test_predictor_has_no_norm_at_its_output_and_names_its_owner():
    q = Predictor(6, 10, owner="objective 'byol'")
    kinds = [type(m).__name__ for m in q.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (q.net[0].in_features, q.net[0].out_features, q.net[-1].out_features) == (6, 10, 6)
    out = q(torch.randn(4, 6, dtype=torch.float64))  # cast to the parameters' dtype
    assert out.dtype == torch.float32 and out.shape == (4, 6)
    with pytest.raises(ShapeError, match="'byol'.*\\[B, 6\\].*\\[4, 5\\]"):
        q(torch.randn(4, 5))
    with pytest.raises(ShapeError, match="'byol'.*1 row"):
        q(torch.randn(1, 6))
    q.eval()
    assert q(torch.randn(1, 6)).shape == (1, 6)
