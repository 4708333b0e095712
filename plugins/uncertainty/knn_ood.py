"""Deep nearest neighbours: the k-th neighbour distance among normalised features.

Sun, Ming, Zhu and Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector
from sdk.ood import FeatureBank, kth_neighbour_distance


def knn_ood_score(bank: Tensor, x: Tensor, k: int = 50) -> Tensor:
    """Anomaly score ``||z - z_(k)||``: the distance of ``z = x / ||x||`` to its ``k``-th
    nearest row of the L2-normalised ``bank`` (k capped at the bank's size)."""
    return kth_neighbour_distance(bank, nn.functional.normalize(x.float(), dim=1), k)


class KNNOOD(Detector):
    """A bank of L2-normalised in-distribution features (:class:`sdk.ood.FeatureBank`); the
    score is the k-th neighbour distance, k = 50 (the paper's CIFAR-10 setting)."""

    def __init__(self, k: Annotated[int, Ge(1)] = 50):
        super().__init__()
        self.k = k
        self.bank = FeatureBank(normalize=True)

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """For the conformance kit: ``(x_in, labels, x_test, x_out)`` with enough fitted rows
        per class (64) for k = 50 to stay within a class: 4 Gaussian clusters in 16 dimensions,
        and out-of-distribution rows in random directions."""
        labels = torch.arange(256 + 32) % 4
        means = 4 * torch.randn(4, 16, generator=generator)
        x = means[labels] + torch.randn(len(labels), 16, generator=generator)
        out = 4 * torch.randn(32, 16, generator=generator)
        return x[:256], labels[:256], x[256:], out

    def accumulate(self, x: Tensor, labels: Tensor | None) -> None:
        self.bank.add(x)

    def forward(self, x: Tensor) -> Tensor:
        return knn_ood_score(self.bank.rows, x, self.k)


CARD = Card(
    name="knn_ood", kind="detector",
    title="Out-of-Distribution Detection with Deep Nearest Neighbors",
    paper="arXiv:2204.06507",
    summary="Distance from the normalised feature to its k-th nearest normalised "
            "in-distribution feature (non-parametric, no class labels); k = 50 as the paper's "
            "CIFAR-10 experiments.",
    formula="z = f(x) / ||f(x)||; s(x) = ||z - z_(k)||, z_(k) the k-th nearest of the "
            "normalised training features",
    left_out="Sampling a fraction alpha of the training set (the paper's ImageNet setting; pass "
             "the subset to fit); the supervised-contrastive training the paper pairs it with; "
             "faiss. The authors' faiss IndexFlatL2 returns squared distances; the plain "
             "distance is used here (the same ranking, the same AUROC). With fewer than k "
             "fitted rows the farthest one is used.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(KNNOOD, card=CARD)
