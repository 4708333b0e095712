"""SupReMix: supervised contrastive learning for regression with mixup-built hard pairs.

Wu, Dong, Chen, Zhou, Zhou, "Mixup Your Own Pairs", 2023 (arXiv:2309.16633).

Anchors are all rows of ``cat(views)`` (L2-normalised); real pairs follow SupCon with
continuous targets (same target = positive, else negative). Two kinds of embedding-level
mixtures are added for each anchor ``i``:

* Mix-neg (anchor-inclusive): ``a z_i + (1 - a) z_k`` for every row ``k`` with
  ``t_k != t_i``, ``a ~ Beta(2, 8)``; a hard negative with target ``a t_i + (1 - a) t_k``.
* Mix-pos (anchor-exclusive): ``a z_j + (1 - a) z_k`` for rows with
  ``t_j < t_i < t_k`` and ``t_i - t_j < window``, ``t_k - t_i < window``, where
  ``a = (t_k - t_i) / (t_k - t_j)`` so the mixed target is exactly ``t_i``: a hard positive.

Mixtures are not renormalised and (as in the reference code) detached, so their logit is
the mix of the anchor's similarities. Distance magnifying weights every denominator term by
``|t_i - t_c| + 1`` (``t_c`` the candidate's, possibly mixed, target). With logits
``s/tau`` over real rows and mixtures, for anchor ``i`` with positives ``P(i)``:

    l_i = -1/|P(i)| sum_{p in P(i)} [ s_ip/tau - log sum_{c != i} w_ic exp(s_ic/tau) ]
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.distributed import Gather
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def supremix_loss(anchors: Tensor, candidates: Tensor, t_anchor: Tensor, t_cand: Tensor,
                  self_col: Tensor, *, temperature: float = 0.3, window: float = 5.0,
                  neg_alpha: Tensor | None = None, mix_negatives: bool = True,
                  mix_positives: bool = True, distance_magnifying: bool = True,
                  detach_mixtures: bool = True) -> tuple[Tensor, Tensor]:
    """Per-anchor SupReMix loss ``[A]`` and the anchors with a positive.

    ``anchors`` [A, D] and ``candidates`` [N, D] are normalised embeddings, ``t_anchor`` [A] and
    ``t_cand`` [N] their targets, ``self_col`` [A] each anchor's own column; ``neg_alpha`` [A, N]
    are the Mix-neg weights of the anchor (required when ``mix_negatives``). Never builds the
    mixtures: their logits are the mixed similarities (cost ``O(A N^2)`` for Mix-pos).
    """
    a, n = anchors.shape[0], candidates.shape[0]
    t_anchor, t_cand = t_anchor.float(), t_cand.float()
    cols = torch.arange(n, device=anchors.device)
    not_self = cols[None, :] != self_col[:, None]
    same = t_anchor[:, None] == t_cand[None, :]
    sim = anchors @ candidates.T
    parts_logits, parts_pos, parts_neg, parts_w = [sim], [same & not_self], [~same], []
    dist = (t_anchor[:, None] - t_cand[None, :]).abs()
    parts_w.append(dist + 1)
    mix_sim = anchors @ (candidates.detach() if detach_mixtures else candidates).T
    if mix_negatives:
        if neg_alpha is None or neg_alpha.shape != (a, n):
            raise ShapeError(f"supremix_loss: neg_alpha must be [{a}, {n}] when mixing negatives")
        own = mix_sim.gather(1, self_col[:, None])
        parts_logits.append(neg_alpha * own + (1 - neg_alpha) * mix_sim)
        parts_neg.append(~same & not_self)
        parts_pos.append(torch.zeros_like(not_self))
        parts_w.append((1 - neg_alpha) * dist + 1)
    if mix_positives:
        below = (t_cand[None, :] < t_anchor[:, None]) & (dist < window)  # j: t_j < t_i
        above = (t_cand[None, :] > t_anchor[:, None]) & (dist < window)  # k: t_k > t_i
        pos_mix = below[:, :, None] & above[:, None, :]  # [A, j, k]
        gap = (t_cand[None, None, :] - t_cand[None, :, None]).clamp_min(torch.finfo(torch.float32).tiny)
        alpha = ((t_cand[None, None, :] - t_anchor[:, None, None]) / gap).clamp(0, 1)
        logit = alpha * mix_sim[:, :, None] + (1 - alpha) * mix_sim[:, None, :]
        parts_logits.append(logit.reshape(a, n * n))
        parts_pos.append(pos_mix.reshape(a, n * n))
        parts_neg.append(torch.zeros(a, n * n, dtype=torch.bool, device=anchors.device))
        parts_w.append(torch.ones(a, n * n, device=anchors.device))
    logits = torch.cat(parts_logits, dim=1) / temperature
    weight = torch.cat(parts_w, dim=1) if distance_magnifying else None
    return contrastive.info_nce(logits, torch.cat(parts_pos, dim=1), torch.cat(parts_neg, dim=1),
                                weight=weight)


def mixup_your_own_pairs_loss(z1: Tensor, z2: Tensor, *more_views: Tensor, targets: Tensor,
                              **params) -> Tensor:
    """Mean SupReMix loss over all views; ``params`` as for :class:`MixupYourOwnPairs`."""
    return MixupYourOwnPairs(**params)(Views(embeddings=(z1, z2, *more_views)),
                                       Batch(targets=targets)).value


class MixupYourOwnPairs(Objective):
    """SupReMix (see the module docstring) for regression targets ``Batch.targets`` [B] or [B, 1].

    ``neg_beta_a``/``neg_beta_b``: the Beta law of the anchor's share in a Mix-neg mixture;
    ``window``: the largest target gap to the two samples of a Mix-pos mixture (in target
    units); ``mix_negatives``/``mix_positives``/``distance_magnifying`` switch the three parts
    (all off gives SupCon with exact-target positives); ``detach_mixtures`` stops the gradient
    through mixtures as the reference code does. ``gather`` ("auto": under DDP) contrasts
    across ranks.
    """

    requires = {"views": 2, "targets": True}
    batch_coupled = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.3, window: Annotated[float, Gt(0)] = 5.0,
                 neg_beta_a: Annotated[float, Gt(0)] = 2.0, neg_beta_b: Annotated[float, Gt(0)] = 8.0,
                 mix_negatives: bool = True, mix_positives: bool = True,
                 distance_magnifying: bool = True, detach_mixtures: bool = True,
                 gather: Gather = "auto"):
        super().__init__()
        self.temperature, self.window = temperature, window
        self.neg_beta_a, self.neg_beta_b = neg_beta_a, neg_beta_b
        self.mix_negatives, self.mix_positives = mix_negatives, mix_positives
        self.distance_magnifying, self.detach_mixtures = distance_magnifying, detach_mixtures
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        targets = batch.targets
        if targets.dim() == 2 and targets.shape[1] == 1:
            targets = targets[:, 0]
        if targets.dim() != 1:
            raise RequirementError("objective 'mixup_your_own_pairs' needs scalar regression targets "
                                   f"[B] or [B, 1], got {list(batch.targets.shape)}")
        c = contrastive.contrast(views, batch.evolve(targets=targets), gather=self.gather)
        t_cand = c.batch.targets.float().repeat(c.n_views)
        t_anchor = t_cand[c.self_col]
        neg_alpha = None
        if self.mix_negatives:
            beta = torch.distributions.Beta(
                torch.tensor(self.neg_beta_a, device=t_cand.device),
                torch.tensor(self.neg_beta_b, device=t_cand.device))
            # drawn for the anchors of every rank, so ranks seeded alike draw as one process
            n = c.candidates.shape[0]
            neg_alpha = beta.sample((n, n))[c.self_col]
        loss, valid = supremix_loss(
            c.anchors.float(), c.candidates.float(), t_anchor, t_cand, c.self_col,
            temperature=self.temperature, window=self.window, neg_alpha=neg_alpha,
            mix_negatives=self.mix_negatives, mix_positives=self.mix_positives,
            distance_magnifying=self.distance_magnifying, detach_mixtures=self.detach_mixtures)
        return Loss(value=contrastive.masked_mean(loss, valid, c),
                    per_sample=contrastive.per_sample(loss, c))

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        views = tuple(torch.randn(batch_size, 16, generator=generator).requires_grad_()
                      for _ in range(2))
        return Views(embeddings=views), Batch(targets=torch.rand(batch_size, generator=generator) * 10)


CARD = Card(
    name="mixup_your_own_pairs", kind="objective", title="Mixup Your Own Pairs (SupReMix)",
    paper="arXiv:2309.16633",
    summary="Contrastive regression: SupCon over real rows plus anchor-inclusive mixtures as "
            "hard negatives and anchor-exclusive mixtures whose mixed target equals the "
            "anchor's as hard positives, with distance-magnified denominators.",
    formula="negatives += a z_i + (1-a) z_k (t_k != t_i, a ~ Beta(2,8)); positives += "
            "a z_j + (1-a) z_k (t_j < t_i < t_k within window, a = (t_k-t_i)/(t_k-t_j)); "
            "l_i = -mean_{p in P(i)} log exp(s_ip/tau) / sum_{c != i} (|t_i - t_c| + 1) exp(s_ic/tau); "
            "mixtures detached by default (detach_mixtures=True, as the reference's mixing function "
            "returns them), so only the anchor side of a mixture's logit carries gradient",
    left_out="The reference code's sub-batch pooling (a memory device); the regression head "
             "trained on top of the representation.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MixupYourOwnPairs, card=CARD)
