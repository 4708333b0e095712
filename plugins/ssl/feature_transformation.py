"""Feature transformation (FT): positive extrapolation and negative interpolation.

Zhu, Liu, Wang, Chen, Qi, Li, Huang & Wang, "Improving Contrastive Learning by Visualizing
Feature Transformation", ICCV 2021 (arXiv:2108.02982).

In feature space, before the InfoNCE loss, with per-dimension coefficients (the authors' code
draws one per sample and dimension):

* positive extrapolation (harder positives): ``q^ = l q + (1 - l) k``, ``k^ = l k + (1 - l) q``,
  ``l = 1 + b``, ``b ~ Beta(pos_alpha, pos_alpha)`` (so ``l in [1, 2]``), which moves the pair
  apart along its difference: ``q^ - k^ = (2 l - 1)(q - k)``, ``q^ + k^ = q + k``;
* negative interpolation (more diverse negatives): each memory negative is mixed with a random
  other one, ``n^_i = m n_i + (1 - m) n_perm(i)``, ``m ~ Beta(neg_alpha, neg_alpha)``.

No renormalisation after mixing (the authors' default). Defaults from the authors' ImageNet
script: both transformations, ``pos_alpha = 2.0``, ``neg_alpha = 1.6``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt
from torch import Tensor

from sdk.card import Card
from sdk.contrastive import NEGATIVES, NEGATIVES_MASK, sample_ids
from sdk.errors import ConfigError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.types import Batch, Pairs, Views


def extrapolate_positives(q: Tensor, k: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(lam q + (1 - lam) k, lam k + (1 - lam) q)`` (``lam`` broadcast to ``q``'s shape)."""
    lam = lam.to(q.dtype)
    return lam * q + (1 - lam) * k, lam * k + (1 - lam) * q


def interpolate_negatives(negatives: Tensor, mix: Tensor, perm: Tensor) -> Tensor:
    """``mix n_i + (1 - mix) n_perm(i)`` for the rows ``n_i`` of ``negatives`` ``[M, D]``."""
    mix = mix.to(negatives.dtype)
    return mix * negatives + (1 - mix) * negatives[perm]


def _beta(alpha: float, shape: torch.Size, like: Tensor) -> Tensor:
    """``Beta(alpha, alpha)`` draws of ``shape`` from torch's global RNG (in float32 or better)."""
    a = torch.tensor(alpha, device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))
    return torch.distributions.Beta(a, a).sample(shape)


def _partners(valid: Tensor | None, memory: Tensor) -> Tensor:
    """The row each memory negative is mixed with: a random permutation of the rows (the
    authors' code), or, when the memory marks which rows hold entries (``valid`` ``[M]``, a
    queue not yet full), a random valid row per row (drawn with replacement; no host sync)."""
    m = memory.shape[0]
    if valid is None:
        return torch.randperm(m, device=memory.device)
    weight = valid.to(torch.float32) + 1e-12  # every row possible: no error when none is valid
    return torch.multinomial(weight, m, replacement=True)


class FeatureTransformation(Sampler):
    """FT as a pair Sampler for an InfoNCE objective (``nt_xent``), over two views.

    ``pairs``: instance discrimination (views of one sample positive, of other samples
    negative). In training, before the loss (its ``after_forward`` listener, on the step's
    ``state.views``), the two views' embeddings are extrapolated (``positive=True``) and the
    memory negatives ``Views.extras["negatives"]`` of a queue / memory bank teacher, when there
    are any, interpolated (``negative=True``; with the queue's ``negatives_mask``, partners are
    drawn among the filled entries only); validation sees the plain features. Draws come
    from torch's global RNG (checkpointed by the Trainer)."""

    produces = frozenset({Input.PAIRS})

    def __init__(self, positive: bool = True, negative: bool = True,
                 pos_alpha: Annotated[float, Gt(0)] = 2.0, neg_alpha: Annotated[float, Gt(0)] = 1.6):
        super().__init__()
        if not (positive or negative):
            raise ConfigError("feature_transformation: positive and negative are both off",
                              param="positive")
        self.positive, self.negative = positive, negative
        self.pos_alpha, self.neg_alpha = pos_alpha, neg_alpha

    def transform(self, views: Views) -> Views:
        """The views with FT applied (new random coefficients each call)."""
        owner = f"sampler {self.name!r}"
        if views.n_views != 2:
            raise ShapeError(f"{owner}: positive extrapolation mixes a pair of views, got "
                             f"{views.n_views} views")
        q, k = views.embeddings
        extras = dict(views.extras)
        if self.positive:
            lam = 1 + _beta(self.pos_alpha, q.shape, q)
            q, k = extrapolate_positives(q, k, lam)
        memory = extras.get(NEGATIVES)
        if self.negative and memory is not None:
            if not isinstance(memory, Tensor) or memory.dim() != 2 or memory.shape[1] != q.shape[1]:
                shape = list(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
                raise ShapeError(f"{owner}: Views.extras[{NEGATIVES!r}] must be [M, {q.shape[1]}], "
                                 f"got {shape}")
            mix = _beta(self.neg_alpha, memory.shape, memory)
            perm = _partners(extras.get(NEGATIVES_MASK), memory)
            extras[NEGATIVES] = interpolate_negatives(memory, mix, perm)
        return views.evolve(embeddings=(q, k), extras=extras)

    def after_forward(self, state: State) -> None:
        if self.training:
            state.views = self.transform(state.views)

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        ids = sample_ids(views)
        same = ids[:, None] == ids[None, :]
        return Pairs(positive=same, negative=~same)


CARD = Card(
    name="feature_transformation", kind="sampler",
    title="Improving Contrastive Learning by Visualizing Feature Transformation",
    paper="arXiv:2108.02982",
    summary="Before InfoNCE, extrapolates each positive pair apart per dimension (harder "
            "positives) and mixes memory negatives with random other ones (more diverse "
            "negatives); instance-discrimination pairs.",
    formula="q^ = l q + (1-l) k, k^ = l k + (1-l) q, l = 1 + Beta(2, 2) per dimension; "
            "n^_i = m n_i + (1-m) n_perm(i), m ~ Beta(1.6, 1.6) per dimension; no renormalisation",
    left_out="The catalogue's note put it as z' = z + lambda (z - z_pos): the authors mix both "
             "members of the pair with per-dimension lambda in [1, 2], which is that with "
             "lambda - 1 ~ Beta(2, 2), applied to q and k alike. Interpolation applies to memory "
             "negatives (a queue / memory_bank teacher, as in the paper's MoCo); in-batch "
             "negatives are not interpolated. While a queue is not full, each entry's partner is "
             "a random filled entry (drawn with replacement) instead of a permutation of the queue. "
             "The authors' other variants (uniform masks, "
             "post-mixing normalisation, one coefficient per sample) are not offered; two views only.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FeatureTransformation, card=CARD)
