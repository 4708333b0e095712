"""Neighbour positives agreed on by several embedding spaces (self-supervised tri-training, SEPT).

Yu et al., "Socially-Aware Self-Supervised Tri-Training for Recommendation", KDD 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Sampler
from sdk.types import Batch, Pairs, Views

AGREEMENTS = ("sum", "vote")


def _cosine(z: Tensor) -> Tensor:
    z = F.normalize(z.detach().float(), dim=-1)
    sim = z @ z.T
    return sim.fill_diagonal_(-3.0)  # below any cosine: a sample is never its own neighbour


def _top_k_mask(scores: Tensor, k: int) -> Tensor:
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def neighbor_agreement_mask(spaces: Sequence[Tensor], k: int = 10, *, agreement: str = "sum",
                            min_agree: int | None = None, temperature: float = 1.0) -> Tensor:
    """Neighbour-positive mask ``[B, B]`` (``mask[i, j]``: j is a positive of anchor i) from the
    embeddings ``[B, D_s]`` of the samples in several spaces; ``i`` is never its own positive.

    ``agreement="sum"`` (SEPT): ``P_i = top-k_j sum_s softmax_{j != i}(cos_s(i, j) / temperature)``.
    ``agreement="vote"``: ``j in P_i`` when j is among the ``k`` cosine nearest neighbours of i in
    at least ``min_agree`` spaces (all of them when None). ``k`` is capped at ``B - 1``.
    """
    if not spaces:
        raise ShapeError("neighbor_agreement_mask: needs at least one embedding space")
    b = spaces[0].shape[0]
    for s, z in enumerate(spaces):
        if z.dim() != 2 or z.shape[0] != b:
            raise ShapeError(f"neighbor_agreement_mask: space {s} has shape {list(z.shape)}; "
                             f"expected [{b}, D]")
    k = min(k, b - 1)
    with torch.no_grad():
        if agreement == "sum":
            prob = sum((_cosine(z) / temperature).softmax(dim=1) for z in spaces)
            return _top_k_mask(prob, k)
        need = len(spaces) if min_agree is None else min_agree
        if not 1 <= need <= len(spaces):
            raise ConfigError(f"tri_training_neighbor_positives: min_agree must be in "
                              f"[1, {len(spaces)}] (the number of spaces voting), got {need}",
                              param="min_agree")
        votes = sum(_top_k_mask(_cosine(z), k).to(torch.int32) for z in spaces)
        return votes >= need


class TriTrainingNeighborPositives(Sampler):
    """Positives of anchor i: the other views of i and every view of the samples in ``P_i``
    (:func:`neighbor_agreement_mask` over the embedding spaces); negatives: all other rows.

    The spaces are the views' embeddings, or those in ``Views.extras[source]`` (a tuple of
    ``[B, D]`` tensors, e.g. several encoders' or heads' embeddings). With ``leave_one_out``
    the anchors of view ``v`` are taught by the other spaces only (tri-training: encoder a's
    positives come from encoders b and c), which needs one space per view.
    """

    produces = frozenset({Input.PAIRS})

    def __init__(self, k: Annotated[int, Ge(1)] = 10,
                 agreement: Annotated[str, one_of(AGREEMENTS)] = "sum",
                 min_agree: Annotated[int, Ge(1)] | None = None,
                 temperature: Annotated[float, Gt(0)] = 1.0, source: str | None = None,
                 leave_one_out: bool = False):
        super().__init__()
        if agreement == "sum" and min_agree is not None:
            raise ConfigError("tri_training_neighbor_positives: min_agree applies to "
                              "agreement='vote' only", param="min_agree")
        if agreement == "vote" and temperature != 1.0:
            raise ConfigError("tri_training_neighbor_positives: temperature applies to "
                              "agreement='sum' only", param="temperature")
        self.k, self.agreement, self.min_agree = k, agreement, min_agree
        self.temperature, self.source, self.leave_one_out = temperature, source, leave_one_out

    def _spaces(self, views: Views) -> list[Tensor]:
        if self.source is None:
            return list(views.embeddings)
        if self.source not in views.extras:
            raise RequirementError(f"sampler 'tri_training_neighbor_positives' needs "
                                   f"Views.extras[{self.source!r}] (a tuple of [B, D] embeddings)")
        spaces = views.extras[self.source]
        spaces = [spaces] if isinstance(spaces, Tensor) else list(spaces)
        for s, z in enumerate(spaces):
            if z.dim() != 2 or z.shape[0] != views.batch_size:
                raise ShapeError(f"Views.extras[{self.source!r}][{s}]: expected shape "
                                 f"[{views.batch_size}, D], got {list(z.shape)}")
        return spaces

    def neighbor_masks(self, views: Views) -> Tensor:
        """Sample-level masks ``[V, B, B]``: row block v's neighbour positives."""
        spaces = self._spaces(views)
        mine = dict(k=self.k, agreement=self.agreement, min_agree=self.min_agree,
                    temperature=self.temperature)
        if not self.leave_one_out:
            return neighbor_agreement_mask(spaces, **mine).expand(views.n_views, -1, -1)
        if len(spaces) != views.n_views or len(spaces) < 2:
            raise ShapeError(f"tri_training_neighbor_positives: leave_one_out needs one space per "
                             f"view and at least 2; got {len(spaces)} spaces for {views.n_views} views")
        return torch.stack([neighbor_agreement_mask(spaces[:v] + spaces[v + 1:], **mine)
                            for v in range(views.n_views)])

    def pairs(self, views: Views, batch: Batch) -> Pairs:
        v, b = views.n_views, views.batch_size
        neighbors = self.neighbor_masks(views)
        eye = torch.eye(b, dtype=torch.bool, device=neighbors.device)
        sample_pos = neighbors | eye  # [V, B, B]
        positive = sample_pos.repeat(1, 1, v).reshape(v * b, v * b)
        return Pairs(positive=positive, negative=~positive)


CARD = Card(
    name="tri_training_neighbor_positives", kind="sampler",
    title="Socially-Aware Self-Supervised Tri-Training for Recommendation (SEPT)",
    paper="arXiv:2106.03569",
    summary="Neighbour-discrimination positives: samples that several embedding spaces (views, "
            "heads or encoders) agree are nearest neighbours of the anchor.",
    formula="sum (SEPT): P_i = top-k_{j != i} sum_s softmax_j(cos_s(i,j)/t) (k=10, t=1); "
            "vote: j in P_i iff #{s : j in kNN_k^s(i)} >= min_agree; leave_one_out: anchors of "
            "view v use all spaces but v. positive[(v,i),(w,j)] = [i = j or j in P_i^v], "
            "negative = not positive",
    left_out="SEPT's loss puts the positives' sum inside the log, -log(sum_{p in P_u+{u}} psi / "
             "sum_j psi), scored against a dropout-perturbed view; with nt_xent this sampler gives "
             "the SupCon (L_out) average of log-ratios instead. The LightGCN encoders, the social "
             "(friend/sharing) graph views and the BPR recommendation loss are not implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(TriTrainingNeighborPositives, card=CARD)
