"""Cross-modal self-supervision: k-means clusters of one modality's features become the training
labels of a classifier on another modality of the same samples.

Reproduces the generic step of Zürn, Burgard & Valada, "Self-Supervised Visual Terrain
Classification from Unsupervised Acoustic Feature Learning", IEEE T-RO 2021 (arXiv:1912.03227):
the clusters of the vehicle-terrain sounds (the proprioceptive modality A) label the camera's
terrain patches, on which the visual classifier (modality B) is trained, with no manual label;
the paper finds it close to the same classifier trained on manual labels and better than
clustering without the other modality. Here the two modalities are two views of scikit-learn's
digits: A = the 8x8 image (64 pixels), B = its row and column ink profiles (16 sums), a weaker
sensor of the same object. A's clusters: ``sdk.cluster.kmeans`` (k = 10); B's classifier:
multinomial logistic regression (``sdk.metrics.fit_linear_probe``). Scored against the true
digits on the test split (never seen by either step): NMI, ARI and the Hungarian-matched
accuracy.

Run: ``python examples/recipes/cross_modal_cluster_labels.py`` (full: 10 k-means seeds);
``main(fast=True)`` is the test's version (3 seeds).
"""

from __future__ import annotations

import torch

from sdk import cluster, data, metrics


def ink_profiles(images: torch.Tensor, shape: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """Modality B: the column sums then the row sums of each flattened image ``[N, H * W]``."""
    im = images.reshape(-1, *shape)
    return torch.cat([im.sum(1), im.sum(2)], dim=1)


def cross_modal_labels(features_a: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """The training labels of modality B: the k-means assignment of modality A's rows."""
    return cluster.kmeans(features_a, k, seed=seed)[0]


def train_on_cluster_labels(features_b: torch.Tensor, labels: torch.Tensor, k: int):
    """Modality B's classifier trained on the cluster labels (logistic regression)."""
    return metrics.fit_linear_probe(features_b, labels, num_classes=k)


def agreement(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """NMI, ARI and Hungarian-matched accuracy of a partition ``pred`` against classes ``truth``."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    k = int(max(pred.max(), truth.max())) + 1
    counts = torch.zeros(k, k).index_put_((pred, truth), torch.ones(pred.numel()), accumulate=True)
    rows, cols = linear_sum_assignment(-counts.numpy())
    return {"nmi": float(normalized_mutual_info_score(truth, pred)),
            "ari": float(adjusted_rand_score(truth, pred)),
            "accuracy": float(counts[rows, cols].sum()) / pred.numel()}


def main(fast: bool = False, seed: int = 0) -> dict:
    """Test-split agreement with the digits of: B's classifier on A's clusters (cross-modal),
    k-means on B alone (no other modality), k-means on A (the labeller itself) and B's classifier
    on the true labels (supervised), averaged over k-means seeds."""
    splits = data.load("digits", seed=0)
    a_train, a_test, y_train, y_test = splits.train.x, splits.test.x, splits.train.y, splits.test.y
    b_train, b_test = ink_profiles(a_train), ink_profiles(a_test)
    k = splits.num_classes
    arms: dict[str, list[dict[str, float]]] = {"cross_modal": [], "kmeans_b": [], "kmeans_a": []}
    for s in range(seed, seed + (3 if fast else 10)):
        labels, centres_a = cluster.kmeans(a_train, k, seed=s)
        classifier = train_on_cluster_labels(b_train, labels, k)
        arms["cross_modal"].append(agreement(classifier.predict(b_test), y_test))
        _, centres_b = cluster.kmeans(b_train, k, seed=s)
        arms["kmeans_b"].append(agreement(torch.cdist(b_test, centres_b).argmin(1), y_test))
        arms["kmeans_a"].append(agreement(torch.cdist(a_test, centres_a).argmin(1), y_test))
    out: dict = {"seeds": len(arms["cross_modal"])}
    for arm, runs in arms.items():
        for key in runs[0]:
            out[f"{arm}/{key}"] = sum(r[key] for r in runs) / len(runs)
        out[f"{arm}/nmi_min"] = min(r["nmi"] for r in runs)
        out[f"{arm}/nmi_max"] = max(r["nmi"] for r in runs)
    supervised = metrics.fit_linear_probe(b_train, y_train).predict(b_test)
    out["supervised_b/accuracy"] = float((supervised == y_test).float().mean())
    return out


if __name__ == "__main__":
    result = main()
    print(f"digits test split, {result['seeds']} k-means seeds: mean NMI / ARI / Hungarian accuracy")
    for arm in ("cross_modal", "kmeans_b", "kmeans_a"):
        print(f"{arm:>12}: {result[f'{arm}/nmi']:.3f} (min {result[f'{arm}/nmi_min']:.3f}) / "
              f"{result[f'{arm}/ari']:.3f} / {result[f'{arm}/accuracy']:.3f}")
    print(f"supervised_b: accuracy {result['supervised_b/accuracy']:.3f}")
