"""mahalanobis against the direct formula (all features at once, float64, a loop over
queries and classes), fitted streaming in uneven batches."""

import torch

import sdk


def clusters(n=400, d=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(classes, d, generator=g) + 100  # far from 0: raw sums would cancel
    labels = torch.randint(0, classes, (n,), generator=g)
    mix = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g)
    return means[labels] + torch.randn(n, d, generator=g) @ mix, labels


def slow_scores(x, y, q):
    x, q = x.double(), q.double()
    classes = sorted(set(y.tolist()))
    means = {c: x[y == c].mean(0) for c in classes}
    centred = torch.stack([x[i] - means[int(y[i])] for i in range(len(x))])
    precision = torch.linalg.inv(centred.T @ centred / len(x))
    return torch.tensor([min(float((r - means[c]) @ precision @ (r - means[c])) for c in classes)
                         for r in q], dtype=torch.float64)


def test_streamed_fit_equals_the_direct_formula():
    x, y = clusters()
    det = sdk.create("detector", "mahalanobis")
    for lo, hi in [(0, 7), (7, 150), (150, 151), (151, 400)]:
        det.update(x[lo:hi], y[lo:hi])
    det.finalize()
    q = torch.cat([x[:10], x[:10] + 4 * torch.randn(10, 5)])
    assert torch.allclose(det.score(q).double(), slow_scores(x, y, q), rtol=1e-6, atol=1e-6)


def test_a_class_absent_from_the_fit_is_not_a_nearest_mean():
    x, y = clusters(classes=3)
    y = torch.where(y == 1, 3, y)  # classes 0, 2, 3; class 1 never seen
    det = sdk.create("detector", "mahalanobis").fit(x, y)
    assert torch.allclose(det.score(x[:8]).double(), slow_scores(x, y, x[:8]), rtol=1e-6)
    assert det.score(torch.zeros(1, 5)) > 0  # the zero mean of class 1 would give 0


def test_memory_does_not_grow_with_the_fitted_rows():
    det = sdk.create("detector", "mahalanobis")
    sizes = []
    for _ in range(3):
        x, y = clusters(n=500, seed=len(sizes))
        det.update(x, y)
        sizes.append(sum(t.numel() for t in det.state_dict().values()))
    assert sizes[0] == sizes[1] == sizes[2]
    assert int(det.num_seen) == 1500
