# Learning a hierarchical polynomial h = g(p(x)) with a three-layer network trained layer-wise:
# Wang, Nichani & Lee, "Learning Hierarchical Polynomials with Three-Layer Neural Networks",
# ICLR 2024 (arXiv:2311.13774), the quadratic-feature case (Nichani, Damian & Lee, NeurIPS 2023,
# arXiv:2305.06986, train the same way), at toy scale.
#
# Run the full version:  PYTHONPATH=. python examples/recipes/recipe_hierarchical_polynomial_layerwise.py
# (the fast version is main(fast=True), which tests/recipes/ runs).
"""``x ~ N(0, I_d)``, ``p(x) = (x^T A x - tr A) / sqrt(2 |A|_F^2)`` (unit variance) with
``A = Q diag(+-1) Q^T`` (a flat spectrum, ``|A|_op = |A|_F / sqrt(d)``), ``g(z) = z^3 / sqrt(15)``
and ``h = g(p)``.

The network ``f(x) = a^T relu(W phi(x) + b)``, ``phi(x) = He_2(V x) / sqrt(2)`` centred (the first
layer: ``V``'s rows uniform on the sphere, frozen), is trained layer-wise with sample splitting:

1. ``W``: one gradient step of the square loss from ``W = 0`` with ``a`` (random signs,
   ``1/m1``) and ``b`` (uniform) fixed, on ``n1`` samples; its step size sets the new
   pre-activations to unit spread. Every neuron's pre-activation becomes ``a_j`` times one
   learnt feature ``u(x) = c^T phi(x)``, the random-feature kernel's smoothing of ``h``, whose
   quadratic part is ``E[g'(p)] p`` up to sampling noise.
2. ``a``: ridge regression (``lambda = 1e-3``) of ``h`` on ``relu(W phi(x) + b)`` over ``n2`` fresh
   samples.

The baseline is the two-layer network with the same frozen first layer (width ``m2``): ridge of
``h`` on ``phi(x)`` over all ``n1 + n2`` samples, its ``lambda`` the best of a grid on the test set
(generous to the baseline). A degree-2 random-feature model cannot represent the ``He_3(p)``
part of ``h`` (40% of its variance for a Gaussian ``p``); a kernel method needs ``d^6`` samples
for it, the layer-wise network ``d^2``.

Where this differs from the papers: their widths, step sizes and sample sizes are polynomial in
``d`` with unstated constants (ours are measured to fit minutes of CPU). Their first step
learns the kernel-smoothed target ``K h``, whose quadratic part is ``E[g'(p)] p``, so ``g`` needs
``E[g'(p)] != 0``: ``He_3`` (``E[He_3'(z)] = 0`` for a Gaussian ``z``) leaves ``p`` only at order
``1/d``. ``A`` has a flat spectrum, as their well-spread quadratic features have.
"""

from __future__ import annotations

import math

import torch

FULL = dict(d=8, n1=16384, n2=4096, m2=512, m1=256, seeds=3)
FAST = dict(d=6, n1=4096, n2=2048, m2=512, m1=256, seeds=1)
TEST = 2000
RIDGE = 1e-3
BIAS_RANGE = 3.0


def ridge(features: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_w |F w - y|^2 / n + lam |w|^2`` (a bias column included by the caller)."""
    n, k = features.shape
    gram = features.T @ features / n + lam * torch.eye(k, dtype=features.dtype)
    return torch.linalg.solve(gram, features.T @ y / n)


def with_bias(f: torch.Tensor) -> torch.Tensor:
    return torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)


def one_seed(seed: int, *, d: int, n1: int, n2: int, m2: int, m1: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=f64))
    signs = torch.ones(d, dtype=f64)
    signs[d // 2:] = -1
    a_mat = q @ torch.diag(signs) @ q.T
    norm = math.sqrt(2 * float((a_mat * a_mat).sum()))

    def p(x):
        return (torch.einsum("ni,ij,nj->n", x, a_mat, x) - a_mat.trace()) / norm

    def h(x):
        return p(x) ** 3 / math.sqrt(15)

    def draw(n):
        return torch.randn(n, d, generator=gen, dtype=f64)

    v = torch.randn(m2, d, generator=gen, dtype=f64)
    v = v / v.norm(dim=1, keepdim=True)
    centre = (((draw(TEST) @ v.T) ** 2 - 1) / math.sqrt(2)).mean(0)

    def phi(x):  # the frozen first layer
        return ((x @ v.T) ** 2 - 1) / math.sqrt(2) - centre

    x1, x2, xt = draw(n1), draw(n2), draw(TEST)
    y1, y2, yt = h(x1), h(x2), h(xt)
    a = (torch.randint(0, 2, (m1,), generator=gen) * 2 - 1).to(f64) / m1
    b = (2 * torch.rand(m1, generator=gen, dtype=f64) - 1) * BIAS_RANGE

    # stage 1: one gradient step on W (a, b fixed), from W = 0
    w = torch.zeros(m1, m2, dtype=f64, requires_grad=True)
    loss = ((torch.relu(phi(x1) @ w.T + b) @ a - y1) ** 2).mean() / 2
    (grad,) = torch.autograd.grad(loss, w)
    step = phi(x1) @ grad.T
    w1 = -grad / step.std(0).mean()  # pre-activations of unit spread

    # stage 2: ridge on the output layer, fresh samples
    def hidden(x):
        return with_bias(torch.relu(phi(x) @ w1.T + b))

    out = ridge(hidden(x2), y2, RIDGE)
    three_layer = float(((hidden(xt) @ out - yt) ** 2).mean())
    # the learnt feature: the pre-activation of a neuron that received a gradient (b_j > 0)
    j = int(torch.nonzero(b > 0)[0])
    u = phi(xt) @ w1[j]
    corr = float(torch.corrcoef(torch.stack([u, p(xt)]))[0, 1])

    # baseline: two-layer random features (the same first layer), ridge on n1 + n2 samples
    xa, ya = torch.cat([x1, x2]), torch.cat([y1, y2])
    fa, ft = with_bias(phi(xa)), with_bias(phi(xt))
    rf = min(float(((ft @ ridge(fa, ya, lam) - yt) ** 2).mean()) for lam in (1e-4, 1e-3, 1e-2, 1e-1))
    return {"var_h": float(yt.var()), "three_layer_mse": three_layer, "random_features_mse": rf,
            "feature_corr_p": abs(corr)}


def main(fast: bool = False, seed: int = 0) -> dict:
    """Per-seed test MSE of the layer-wise three-layer network and of the two-layer random
    features, the test variance of ``h``, and ``|corr(u, p)|`` of the learnt feature."""
    size = dict(FAST if fast else FULL)
    seeds = size.pop("seeds")
    runs = [one_seed(seed + k, **size) for k in range(seeds)]
    return {key: [r[key] for r in runs] for key in runs[0]}


if __name__ == "__main__":
    result = main()
    n = len(result["var_h"])
    print(f"{'':<20} " + " ".join(f"seed{k:<3}" for k in range(n)) + "  mean")
    for key, values in result.items():
        print(f"{key:<20} " + " ".join(f"{v:7.3f}" for v in values)
              + f"  {sum(values) / n:.3f}")
