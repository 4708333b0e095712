"""RCAL's representation calibration: per-class Gaussians of the features, estimated robustly
against mislabelled rows, the tail classes' covariances calibrated from their nearest head
classes, and the classifier retrained on features sampled from the calibrated Gaussians
together with the real ones.

Zhang, Zhao, Yao, Yuan, Huang, "When Noisy Labels Meet Long Tail Dilemmas: A Representation
Calibration Method", ICCV 2023 (arXiv:2211.10955).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Lt
from torch import Tensor

from sdk.calibration import FIT_DTYPE, check_fit_inputs, fit_linear_head
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "RCALGaussianFeatureSampling", "calibrate_tails", "robust_moments",
           "sample_features"]


def robust_moments(x: Tensor, labels: Tensor, num_classes: int, trim: float = 0.1) -> tuple[Tensor, ...]:
    """Per-class means ``[C, D]``, covariances ``[C, D, D]`` (``1 / (n - 1)``) and counts ``[C]``
    from the rows of each class left after dropping the ``trim`` fraction (rounded down) that lie
    farthest from the class's coordinate-wise median (mislabelled rows sit far from it)."""
    means, covs, counts = [], [], []
    for c in range(num_classes):
        rows = x[labels == c]
        dist = (rows - rows.median(dim=0).values).norm(dim=1)
        keep = rows[dist.argsort()[: rows.shape[0] - int(trim * rows.shape[0])]]
        mu = keep.mean(dim=0)
        centred = keep - mu
        cov = centred.T @ centred / max(keep.shape[0] - 1, 1)
        means.append(mu), covs.append(cov), counts.append(rows.shape[0])
    return torch.stack(means), torch.stack(covs), torch.tensor(counts, device=x.device)


def calibrate_tails(means: Tensor, covs: Tensor, counts: Tensor, neighbours: int = 2,
                    alpha: float = 0.2) -> Tensor:
    """Tail classes (fewer rows than the mean count) take the covariance ``(Sigma_t + sum_{i in
    S_t} Sigma_i) / (|S_t| + 1) + alpha I``, ``S_t`` the ``neighbours`` head classes whose means
    are nearest ``mu_t``; head classes keep theirs. Returns the covariances ``[C, D, D]``."""
    head = counts >= counts.double().mean()
    out = covs.clone()
    head_ids = head.nonzero().flatten()
    k = min(neighbours, head_ids.numel())
    eye = torch.eye(means.shape[1], dtype=covs.dtype, device=covs.device)
    for t in (~head).nonzero().flatten().tolist():
        near = head_ids[torch.cdist(means[t:t + 1], means[head_ids])[0].argsort()[:k]]
        out[t] = (covs[t] + covs[near].sum(dim=0)) / (k + 1) + alpha * eye
    return out


def sample_features(means: Tensor, covs: Tensor, n: int, generator: torch.Generator,
                    jitter: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``n`` draws per class from ``N(mu_c, Sigma_c)`` (a Cholesky factor of ``Sigma_c +
    jitter I``): features ``[C n, D]`` and their class ids."""
    c, d = means.shape
    eye = torch.eye(d, dtype=covs.dtype, device=covs.device)
    factor = torch.linalg.cholesky(covs + jitter * eye)
    z = torch.randn(c, n, d, generator=generator, dtype=means.dtype).to(means.device)
    x = means[:, None, :] + z @ factor.transpose(1, 2)
    return x.reshape(c * n, d), torch.arange(c, device=means.device).repeat_interleave(n)


class RCALGaussianFeatureSampling(ResizableBuffers, Calibrator):
    """``inputs = "features"``: ``fit(features [N, D], noisy labels)`` estimates the per-class
    Gaussians (:func:`robust_moments`), calibrates the tail classes' covariances from the head
    classes (:func:`calibrate_tails`), draws ``samples_per_class`` features of every class
    (:func:`sample_features`, from ``seed``) and retrains a softmax head on the real and sampled
    features (``weight_decay``, ``max_iter``); ``calibrator(features)`` returns its logits
    ``[N, num_classes]``. ``samples_per_class = 0`` is the plain head on the real features."""

    inputs = "features"
    resizable_buffers = ("weight", "bias", "means", "covariances")

    def __init__(self, num_classes: Annotated[int, Ge(2), FromData("num_classes")] = 10,
                 samples_per_class: Annotated[int, Ge(0)] = 200,
                 trim: Annotated[float, Ge(0), Lt(1)] = 0.1, neighbours: Annotated[int, Ge(1)] = 2,
                 alpha: Annotated[float, Ge(0)] = 0.2, weight_decay: Annotated[float, Ge(0)] = 1e-3,
                 max_iter: Annotated[int, Ge(1)] = 200, seed: int = 0):
        super().__init__()
        self.num_classes, self.samples_per_class, self.trim = num_classes, samples_per_class, trim
        self.neighbours, self.alpha, self.weight_decay = neighbours, alpha, weight_decay
        self.max_iter, self.seed = max_iter, seed
        for name in self.resizable_buffers:
            self.register_buffer(name, torch.zeros(0, dtype=FIT_DTYPE))

    def fit(self, features: Tensor, labels: Tensor, **extra: Any) -> RCALGaussianFeatureSampling:
        check_fit_inputs(self, features, labels)
        counts = torch.bincount(labels, minlength=self.num_classes)
        if int(counts.min()) < 2:
            raise ShapeError(f"calibrator {self.name!r}: every class needs at least 2 labelled "
                             f"rows to estimate its Gaussian, got counts {counts.tolist()}")
        x = features.detach().to(FIT_DTYPE)
        means, covs, counts = robust_moments(x, labels, self.num_classes, self.trim)
        covs = calibrate_tails(means, covs, counts, self.neighbours, self.alpha)
        if self.samples_per_class > 0:
            g = torch.Generator().manual_seed(self.seed)
            sampled, ids = sample_features(means, covs, self.samples_per_class, g)
            x, labels = torch.cat([x, sampled]), torch.cat([labels, ids])
        weight, bias = fit_linear_head(x, labels, self.num_classes,
                                       weight_decay=self.weight_decay, max_iter=self.max_iter)
        device = self.weight.device
        self.weight, self.bias = weight.to(device), bias.to(device)
        self.means, self.covariances = means.to(device), covs.to(device)
        return self

    def forward(self, features: Tensor) -> Tensor:
        if self.weight.numel() == 0:
            raise NotFittedError(f"calibrator {self.name!r}: call fit(features, labels) before calibrating")
        if features.shape[1] != self.weight.shape[1]:
            raise ShapeError(f"calibrator {self.name!r}: its input has {features.shape[1]} feature "
                             f"columns {list(features.shape)}, but it was fitted on {self.weight.shape[1]}")
        return (features.to(FIT_DTYPE) @ self.weight.T + self.bias).to(features.dtype)

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.arange(max(batch_size, 2 * self.num_classes)) % self.num_classes
        x = 2 * torch.nn.functional.one_hot(labels, self.num_classes).float()[:, :4]
        return x + torch.randn(labels.numel(), 4, generator=g), labels


CARD = Card(
    name="rcal_gaussian_feature_sampling", kind="calibrator",
    title="When Noisy Labels Meet Long Tail Dilemmas: A Representation Calibration Method",
    paper="arXiv:2211.10955",
    summary="Models each class's features as a Gaussian estimated robustly against mislabelled "
            "rows, borrows the tail classes' covariances from their nearest head classes, and "
            "retrains the classifier on features sampled from the calibrated Gaussians plus the "
            "real ones, for noisily labelled, long-tailed data.",
    formula="mu_c, Sigma_c from the rows of class c nearest its median (the farthest trim = 10% "
            "dropped); tail c (n_c below the mean count): Sigma_c <- (Sigma_c + sum_{i in S_c} "
            "Sigma_i) / (|S_c| + 1) + alpha I, S_c the k = 2 head classes with the nearest means, "
            "alpha = 0.2; draw m = 200 features per class from N(mu_c, Sigma_c); retrain the "
            "softmax head on real + sampled features (cross-entropy + 1e-3 ||W||^2); inputs = "
            "'features' [N, D], output logits [N, num_classes]",
    left_out="The contrastive pre-training of the representations and RCAL's representation "
             "regulariser during classifier training (an encoder and callback part) are not "
             "here: the calibrator takes fixed features and retrains a linear head. The robust "
             "estimator (median-distance trimming), the head / tail split (the mean count), "
             "the calibration rule (covariances only, means kept), k, alpha, the sample count and "
             "the head's weight decay are this implementation's choices, not checked against "
             "the paper's text, which was not available here beyond its abstract.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RCALGaussianFeatureSampling, card=CARD)
