"""CLAN: contrastive learning with augmented negative pairs for one-class anomaly detection.

Wilkie, Hindy, Tachtatzis & Atkinson, "Contrastive Self-Supervised Network Intrusion Detection
using Augmented Negative Pairs", IEEE CSR 2025, arXiv:2509.06550 (reference code
github.com/jackwilkie/CLAN).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.state import ResizableBuffers
from sdk.types import Batch, Loss, Views


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``d(a_i, b_j) = (1 - cos(a_i, b_j)) / 2`` in [0, 1], as a matrix [A, B]."""
    return (1 - F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T) / 2


def clan_terms(z: Tensor, z_aug: Tensor, *, margin: float = 0.6, alpha: float = 0.5,
               squared: bool = True, eps: float = 1e-6, candidates: Tensor | None = None,
               self_col: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CLAN loss and per-anchor losses (their mean is the loss).

    Anchors ``z`` [B, D] (benign samples) are pulled to the other benign samples (``candidates``,
    default ``z``; ``self_col`` marks each anchor's own column) and pushed beyond ``margin`` from
    every augmented sample ``z_aug`` [M, D]::

        L = alpha * sum_{i != j} d_ij^p / #{d_ij^p > eps}
            + (1 - alpha) * sum_{i, m} [margin - d(z_i, a_m)]_+^p / #{[.]_+^p > eps}

    with ``p = 2`` when ``squared`` (else 1): means over the non-zero terms.
    """
    candidates = z if candidates is None else candidates
    b = z.shape[0]
    if self_col is None:
        self_col = torch.arange(b, device=z.device)
    power = 2 if squared else 1
    intra = cosine_distance(z, candidates).pow(power)
    not_self = torch.arange(candidates.shape[0], device=z.device)[None, :] != self_col[:, None]
    intra = intra * not_self
    hinge = F.relu(margin - cosine_distance(z, z_aug)).pow(power)
    n_sim = (intra > eps).sum().clamp_min(1)
    n_dissim = (hinge > eps).sum().clamp_min(1)
    per_anchor = b * (alpha * intra.sum(dim=1) / n_sim + (1 - alpha) * hinge.sum(dim=1) / n_dissim)
    return per_anchor.mean(), per_anchor


def clan_loss(z: Tensor, z_aug: Tensor, *, margin: float = 0.6, alpha: float = 0.5,
              squared: bool = True, eps: float = 1e-6) -> Tensor:
    """Scalar CLAN loss; see :func:`clan_terms`."""
    return clan_terms(z, z_aug, margin=margin, alpha=alpha, squared=squared, eps=eps)[0]


def anomaly_score(z: Tensor, centroid: Tensor) -> Tensor:
    """CLAN's score: ``-cos(z_i, c)`` with ``c`` the mean benign training embedding (higher is
    more anomalous)."""
    return -F.cosine_similarity(z.float(), centroid.float()[None, :], dim=-1)


class CLANAugmentedNegatives(ResizableBuffers, Objective):
    """CLAN objective. ``Views.embeddings[0]`` are the benign samples, every further view holds
    augmented copies, which are negatives of every benign anchor (see :func:`clan_terms`).

    After training, :meth:`fit_centroid` (called by ``on_fit_end`` with the training set's
    embeddings) stores the benign centroid and :meth:`anomaly_score` scores new samples.
    ``gather`` ("auto": under DDP) contrasts against the samples of every rank.
    """

    resizable_buffers = ("centroid",)

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, margin: Annotated[float, Gt(0)] = 0.6,
                 alpha: Annotated[float, Interval(ge=0, le=1)] = 0.5, squared: bool = True,
                 eps: Annotated[float, Ge(0)] = 1e-6, gather: Gather = "auto"):
        super().__init__()
        self.margin, self.alpha, self.squared, self.eps, self.gather = margin, alpha, squared, eps, gather
        self.register_buffer("centroid", torch.empty(0))

    def forward(self, views: Views, batch: Batch) -> Loss:
        z = views.embeddings[0]
        z_aug = torch.cat(views.embeddings[1:])
        candidates, self_col = z, None
        if resolve_gather(self.gather):
            candidates, z_aug = gather_with_grad(z), gather_with_grad(z_aug)
            self_col = torch.arange(z.shape[0], device=z.device) + rank() * z.shape[0]
        value, per_anchor = clan_terms(z, z_aug, margin=self.margin, alpha=self.alpha,
                                       squared=self.squared, eps=self.eps, candidates=candidates,
                                       self_col=self_col)
        return Loss(value=value, per_sample=per_anchor)

    @torch.no_grad()
    def fit_centroid(self, benign_embeddings: Tensor) -> None:
        """Store the mean benign embedding used by :meth:`anomaly_score`."""
        self.centroid = benign_embeddings.float().mean(dim=0)

    def anomaly_score(self, z: Tensor) -> Tensor:
        if self.centroid.numel() == 0:
            raise RuntimeError("clan_augmented_negatives: no benign centroid; call fit_centroid() "
                               "with the benign training embeddings first")
        return anomaly_score(z, self.centroid)

    def on_fit_end(self, state: State) -> None:
        self.fit_centroid(state.trainer.embed(state.trainer.train_loader))


CARD = Card(
    name="clan_augmented_negatives", kind="objective",
    title="Contrastive Self-Supervised Network Intrusion Detection using Augmented Negative Pairs",
    paper="arXiv:2509.06550",
    summary="One-class contrastive learning: benign samples attract each other, augmented samples "
            "(stand-ins for malicious traffic) are pushed beyond a margin; anomaly score is the "
            "negative cosine to the benign centroid.",
    formula="d = (1 - cos)/2; L = alpha * sum_{i!=j} d(z_i,z_j)^2 / #nonzero + (1 - alpha) * "
            "sum_{i,m} [m - d(z_i, aug_m)]_+^2 / #nonzero; score(x) = -cos(f(x), mean_benign f)",
    left_out="The tabular augmentation (uniform feature resampling, p=0.1, U(-1.5, 1.5)) belongs "
             "to a transform; the Lycos2017 data and the few-shot fine-tuning stage.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CLANAugmentedNegatives, card=CARD)
