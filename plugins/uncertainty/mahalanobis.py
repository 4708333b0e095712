"""Mahalanobis distance to the closest class mean under a shared covariance.

Lee, Lee, Lee and Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
and Adversarial Attacks", NeurIPS 2018.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector
from sdk.ood import ClassMoments
from sdk.state import ResizableBuffers


def mahalanobis_score(x: Tensor, means: Tensor, precision: Tensor, present: Tensor | None = None) -> Tensor:
    """Anomaly score ``min_c (x - mu_c)^T P (x - mu_c)`` (float64), over the classes where
    ``present`` (all when None), computed as ``x P x - 2 x P mu_c + mu_c P mu_c`` (memory
    ``N x C``, never ``N x C x D``)."""
    x = x.to(precision.dtype)
    pm = means @ precision
    d = (x @ precision * x).sum(1, keepdim=True) - 2 * x @ pm.T + (pm * means).sum(1)[None]
    if present is not None:
        d = d.masked_fill(~present[None], torch.inf)
    return d.amin(1).clamp_min(0)


class Mahalanobis(ResizableBuffers, Detector):
    """Class means and the shared covariance of in-distribution features, streamed through
    :class:`sdk.ood.ClassMoments` (float64; memory ``C x D + D x D``); the precision is the
    pseudo-inverse of the covariance, as the authors' ``sklearn.covariance.EmpiricalCovariance``."""

    needs_labels = True
    resizable_buffers: ClassVar[tuple[str, ...]] = ("class_means", "present", "precision")

    def __init__(self) -> None:
        super().__init__()
        self.moments = ClassMoments(f"detector {self.name!r}")
        self.register_buffer("class_means", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("present", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("precision", torch.zeros(0, 0, dtype=torch.float64))

    def accumulate(self, x: Tensor, labels: Tensor | None) -> None:
        self.moments.update(x, labels)

    def summarize(self) -> None:
        counts, self.class_means, scatter = self.moments.reduced()  # over every rank's rows
        self.present = counts > 0
        self.precision = torch.linalg.pinv(scatter / counts.sum(), hermitian=True)

    def forward(self, x: Tensor) -> Tensor:
        return mahalanobis_score(x, self.class_means, self.precision, self.present)


CARD = Card(
    name="mahalanobis", kind="detector",
    title="A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
    paper="arXiv:1807.03888",
    summary="Squared Mahalanobis distance of a feature to its closest class mean under one "
            "covariance shared by the classes (a tied-covariance Gaussian discriminant), fitted "
            "streaming from float64 sufficient statistics (1000 classes x 1024 features: 16 MiB); "
            "merged over ranks when distributed.",
    formula="mu_c = 1/N_c sum_{y_i = c} f_i; Sigma = 1/N sum_c sum_{y_i = c} (f_i - mu_c)(f_i - mu_c)^T; "
            "s(x) = min_c (f(x) - mu_c)^T Sigma^+ (f(x) - mu_c)",
    left_out="The paper's input pre-processing (a gradient step on x, as ODIN's) and its "
             "ensemble of layers weighted by a logistic regression fitted on validation OOD "
             "data; one feature layer is scored. Classes never seen in the fit are skipped.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Mahalanobis, card=CARD)
