"""Correlated feature masking (CFM): hide a seed feature together with the features most
informative about it, and show the other view the complement.

Yao et al., "Self-supervised Learning for Large-scale Item Recommendations", CIKM 2021
(arXiv:2007.12865).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Transform
from sdk.types import Batch


def discretize(x: Tensor, bins: int) -> tuple[Tensor, int]:
    """``(codes [N, F] long, number of codes)``: integer features as they are (codes ``>= 0``),
    floating ones cut into ``bins`` quantile bins of each column."""
    if not x.is_floating_point():
        return x.long(), int(x.max()) + 1
    q = torch.quantile(x.double(), torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1], dim=0)
    codes = (x.double()[:, None, :] > q[None]).sum(1)  # [N, F]: how many inner edges lie below
    return codes, bins


def mutual_information(codes: Tensor, n_codes: int) -> Tensor:
    """``[F, F]`` (nats): ``MI(a, b) = sum_{k,l} p(a=k, b=l) log(p(a=k, b=l) / (p(a=k) p(b=l)))``
    between the columns of ``codes [N, F]`` (values in ``[0, n_codes)``), from their empirical
    joint frequencies (``0 log 0 = 0``)."""
    onehot = torch.nn.functional.one_hot(codes, n_codes).double()  # [N, F, K]
    joint = torch.einsum("nak,nbl->akbl", onehot, onehot) / codes.shape[0]
    marg = onehot.mean(0)  # [F, K]
    indep = marg[:, :, None, None] * marg[None, None]  # [F, K, F, K]
    ratio = torch.where(joint > 0, joint / indep.clamp_min(1e-300), torch.ones_like(joint))
    return (joint * ratio.log()).sum((1, 3)).float()


def correlated_mask(mi: Tensor, seeds: Tensor, n_mask: int) -> Tensor:
    """``[B, F]`` (1.0 = masked): each row masks its seed feature and the ``n_mask - 1`` features
    of highest ``mi[seed, j]`` (ties in feature order)."""
    scores = mi[seeds].clone()  # [B, F]
    scores.scatter_(1, seeds[:, None], float("inf"))
    order = torch.argsort(-scores, dim=1, stable=True)[:, :n_mask]
    return torch.zeros_like(scores).scatter_(1, order, 1.0)


class CorrelatedFeatureMasking(Transform):
    """``x [B, num_features]`` (or any ``[B, ...]`` of that many values): the first view
    (``complement=False``) draws a seed feature uniformly per sample, masks it and the
    ``round(mask_ratio * F) - 1`` features of highest mutual information with it (setting them to
    ``fill``) and writes the mask to ``Batch.extras`` :data:`sdk.keys.MASK` ``[B, F]``; the second
    view (``complement=True``, the next transform) masks the complement of that mask. The mutual
    information is ``mutual_information`` when given, else estimated from ``dataset`` (the
    training split's inputs, :func:`discretize` d into ``bins`` quantile bins), else from each
    batch (the complement view uses none of them: it reads the first view's mask). Pair it with a
    contrastive objective (``nt_xent``) between the two views."""

    def __init__(self, num_features: Annotated[int, Ge(2)] = 64,
                 mask_ratio: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
                 complement: bool = False, fill: float = 0.0,
                 mutual_information: Any = None,
                 dataset: Annotated[Any, FromData("dataset")] = None,
                 bins: Annotated[int, Ge(2)] = 4):
        super().__init__()
        self.num_features, self.mask_ratio, self.complement = num_features, mask_ratio, complement
        self.fill, self.bins = fill, bins
        self.n_mask = min(max(int(round(mask_ratio * num_features)), 1), num_features - 1)
        if complement and mutual_information is not None:
            raise ConfigError("correlated_feature_masking: the complement view takes the first "
                              "view's mask; give mutual_information to the first view",
                              param="mutual_information")
        mi = None
        if mutual_information is not None:
            mi = torch.as_tensor(mutual_information, dtype=torch.float32)
            if mi.shape != (num_features, num_features):
                raise ConfigError(f"correlated_feature_masking: mutual_information must be "
                                  f"[{num_features}, {num_features}] (num_features), got "
                                  f"{list(mi.shape)}", param="mutual_information")
        elif dataset is not None and not complement:
            x = dataset[:][0] if not isinstance(dataset, Tensor) else dataset
            x = x.reshape(x.shape[0], -1)
            if x.shape[1] != num_features:
                raise ConfigError(f"correlated_feature_masking: the dataset has {x.shape[1]} "
                                  f"features, num_features={num_features}", param="num_features")
            mi = mutual_information_of(x, bins)
        self.register_buffer("mi", mi if mi is not None else torch.zeros(0, 0))

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        owner = "transform 'correlated_feature_masking'"
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.num_features or not x.is_floating_point():
            raise ShapeError(f"{owner}: x must be floating with {self.num_features} features per "
                             f"sample (num_features), got {x.dtype} {list(x.shape)}")
        if self.complement:
            mask = batch.extras.get(keys.MASK)
            if mask is None:
                raise RequirementError(f"{owner} (complement=True) needs Batch.extras['mask'] from "
                                       "the first view's correlated_feature_masking (put that one first)")
            if mask.shape != flat.shape:
                raise ShapeError(f"{owner}: Batch.extras['mask'] must be [{flat.shape[0]}, "
                                 f"{self.num_features}], got {list(mask.shape)}")
            hide = 1 - mask
        else:
            mi = self.mi if self.mi.numel() else mutual_information_of(flat.detach(), self.bins)
            seeds = torch.randint(0, self.num_features, (flat.shape[0],), device=x.device)
            mask = correlated_mask(mi.to(x.device), seeds, self.n_mask)
            hide, batch = mask, batch.evolve(extras={**batch.extras, keys.MASK: mask})
        out = torch.where(hide.bool(), torch.full_like(flat, self.fill), flat)
        return out.reshape(x.shape), batch

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        return (torch.randn(batch_size, self.num_features, generator=generator),
                Batch(index=torch.arange(batch_size)))


def mutual_information_of(x: Tensor, bins: int) -> Tensor:
    """The ``[F, F]`` mutual information of the columns of ``x [N, F]`` (:func:`discretize`,
    :func:`mutual_information`)."""
    codes, n = discretize(x, bins)
    return mutual_information(codes, n)


CARD = Card(
    name="correlated_feature_masking", kind="transform",
    title="Self-supervised Learning for Large-scale Item Recommendations (CFM)",
    paper="arXiv:2007.12865",
    summary="Two complementary feature masks for a two-view contrastive loss: one view hides a "
            "uniformly drawn seed feature and the features of highest mutual information with "
            "it (half of all), the other view hides the rest.",
    formula="seed ~ U{1..F}; M = {seed} + top_{n-1}_j MI(seed, j), n = round(r F); view 1: "
            "x_j = fill for j in M; view 2: x_j = fill for j not in M; MI(a, b) = sum p(a, b) "
            "log p(a, b) / (p(a) p(b)) over the training set",
    left_out="Features are the columns of a flat input (numeric ones cut into quantile bins to "
             "estimate the mutual information; the paper's categorical features and their "
             "embeddings, and its mix of CFM with dropout on multi-valued features, are not here). "
             "Masking sets a value to `fill` (the paper replaces a masked feature's embedding by "
             "a default one). The two-tower recommender, the contrastive objective (nt_xent here) "
             "and the multi-task training with the retrieval loss are separate.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CorrelatedFeatureMasking, card=CARD)
