"""Unsupervised pretraining (MLE of a Gaussian mixture on m unlabelled samples), then ERM
(logistic regression on n labelled samples) on the mixture's posteriors, against supervised ERM
on the same n raw samples.

Reproduces the Gaussian-mixture case of Ge, Tang, Fan & Jin, "On the Provable Advantage of
Unsupervised Pretraining", ICLR 2024 (arXiv:2303.01566): MLE + ERM has excess risk
O~(sqrt(C_Phi / m) + sqrt(C_Psi / n)) against O~(sqrt(C_Phi∘Psi / n)) for supervised ERM, so
pretraining helps when m >> n, and the advantage fades as n grows. Data: scikit-learn's digits
(the training split's 1079 images are the m unlabelled samples, n per class of them labelled;
the test split scores both). Latent-variable model: scikit-learn's PCA to 20 dimensions and
GaussianMixture (EM, 10 full-covariance components, the best likelihood of 4 starts); ERM:
``sdk.metrics.fit_linear_probe`` (multinomial logistic regression).

Run: ``python examples/recipes/recipe_unsup_pretrain_then_erm.py`` (full: 10 seeds, n = 1, 2, 5,
20, 80 per class); ``main(fast=True)`` is the test's version (2 seeds, n = 1, 2 and 80).
"""

from __future__ import annotations

import torch

from sdk import data, metrics


def labelled_subset(y: torch.Tensor, n_per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``n_per_class`` samples of every class of ``y``, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(int(y.max()) + 1):
        rows = (y == c).nonzero().flatten()
        picks.append(rows[torch.randperm(rows.numel(), generator=g)[:n_per_class]])
    return torch.cat(picks)


def gmm_posteriors(unlabelled: torch.Tensor, *others: torch.Tensor, components: int = 10,
                   pca_dim: int = 20, starts: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Pretraining: PCA and a full-covariance Gaussian mixture fitted by EM (MLE: the highest
    likelihood of ``starts`` runs) on the ``unlabelled`` rows only; returns the posteriors
    ``p(z = k | x)`` of ``unlabelled`` and of every other given set."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    pca = PCA(pca_dim, random_state=seed).fit(unlabelled.numpy())
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-3, n_init=starts,
                          random_state=seed)
    gmm.fit(pca.transform(unlabelled.numpy()))
    return [torch.as_tensor(gmm.predict_proba(pca.transform(x.numpy())), dtype=torch.float32)
            for x in (unlabelled, *others)]


def main(fast: bool = False, seed: int = 0) -> dict:
    """Test accuracy of pretrain + ERM and of raw ERM, averaged over seeds, per labelled n."""
    splits = data.load("digits", seed=0)
    x_train, y_train = splits.train.x, splits.train.y
    x_test, y_test = splits.test.x, splits.test.y
    seeds = range(seed, seed + (2 if fast else 10))
    sizes = (1, 2, 80) if fast else (1, 2, 5, 20, 80)
    acc = {(arm, n): [] for arm in ("pretrain_erm", "raw_erm") for n in sizes}
    for s in seeds:
        z_train, z_test = gmm_posteriors(x_train, x_test, seed=s)  # m = all 1079 training images
        for n in sizes:
            rows = labelled_subset(y_train, n, s)
            acc["pretrain_erm", n].append(metrics.linear_probe_accuracy(
                z_train[rows], y_train[rows], z_test, y_test))
            acc["raw_erm", n].append(metrics.linear_probe_accuracy(
                x_train[rows], y_train[rows], x_test, y_test))
    out: dict = {"m": x_train.shape[0], "seeds": len(seeds)}
    for n in sizes:
        for arm in ("pretrain_erm", "raw_erm"):
            out[f"{arm}/n={n}"] = sum(acc[arm, n]) / len(seeds)
        out[f"gap/n={n}"] = out[f"pretrain_erm/n={n}"] - out[f"raw_erm/n={n}"]
        out[f"gap_min/n={n}"] = min(a - b for a, b in zip(acc["pretrain_erm", n], acc["raw_erm", n]))
    return out


if __name__ == "__main__":
    result = main()
    print(f"digits, m = {result['m']} unlabelled, {result['seeds']} seeds; test accuracy")
    print("n per class | pretrain (GMM) + ERM | raw ERM | gap (min over seeds)")
    for key in result:
        if key.startswith("gap/"):
            n = key.split("=")[1]
            print(f"{n:>11} | {result[f'pretrain_erm/n={n}']:.3f} | {result[f'raw_erm/n={n}']:.3f} | "
                  f"{result[key]:+.3f} ({result[f'gap_min/n={n}']:+.3f})")
