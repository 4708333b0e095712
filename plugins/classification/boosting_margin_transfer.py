"""Deep Boosting Learning: a target branch trained past a frozen anchor branch's matching margins.

Diao, Zhang, Gao, Ruan & Lu, "Deep Boosting Learning: A Brand-new Cooperative Approach for
Image-Text Matching", IEEE TIP 2024 (arXiv:2404.18114). An anchor branch is first trained with
the bidirectional hinge (triplet) ranking loss; a target branch is then trained with the same
loss plus ``alpha`` times a boosting loss that asks it to beat the anchor's scores:

* ``"abs"`` (the code's default ``BoostabsLoss``): each positive pair at least ``m gamma``
  above the anchor's score, each negative at least ``m (1 - gamma)`` below the anchor's
  (hardest negative per image and per text), the positive term counted twice;
* ``"rel"`` (``BoostrelLoss``): the target's positive-negative gap larger than the anchor's
  gap by ``m``: an adaptive margin ``m + (s^a_ii - s^a_ij)`` on ``s_ii - s_ij`` (hardest
  negative per image and per text).

Defaults as the authors' code (github.com/Paranioar/DBL, ``opts.py`` and ``loss.py``): ``m =
0.2`` times ``beta = 1``, ``gamma = 0.5``, ``alpha = 1``, the hardest negative only
(``max_violation``). Scores are the cosines of the two views' embeddings (the code's
normalised image and text embeddings).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval

from sdk import classification as cls
from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import RequirementError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import check_teacher
from sdk.types import Batch, Loss, Views

NAME = "boosting_margin_transfer"


def scores(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``s_ij = cos(image_i, text_j)`` [N, M]."""
    return F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T


def _hardest(cost_s: torch.Tensor, cost_im: torch.Tensor, rows: slice) -> torch.Tensor:
    """Per local sample ``i`` (``rows`` of the square [N, N] costs, the positives on the
    diagonal cleared): the hardest text of image ``i`` in ``cost_s`` (its row) plus the hardest
    image of text ``i`` in ``cost_im`` (its column)."""
    eye = torch.eye(cost_s.shape[0], dtype=torch.bool, device=cost_s.device)
    return (cost_s.masked_fill(eye, 0.0)[rows].max(1).values
            + cost_im.masked_fill(eye, 0.0)[:, rows].max(0).values)


def birank(s: torch.Tensor, margin: float, rows: slice | None = None) -> torch.Tensor:
    """The bidirectional hinge ranking loss with the hardest negatives (VSE++), per sample
    ``i``: ``max_j [m + s_ij - s_ii]_+ + max_j [m + s_ji - s_ii]_+`` (the code's ``BirankLoss``)."""
    rows = slice(None) if rows is None else rows
    pos = s.diagonal()
    # image i against the texts j (rows), text j against the images i (columns)
    return _hardest((margin + s - pos[:, None]).clamp_min(0), (margin + s - pos[None, :]).clamp_min(0), rows)


def boost_abs(s: torch.Tensor, s_anchor: torch.Tensor, margin: float, gamma: float,
              rows: slice | None = None) -> torch.Tensor:
    """``BoostabsLoss`` per sample: ``2 [m gamma + s^a_ii - s_ii]_+ + max_j [m (1 - gamma) + s_ij -
    s^a_ij]_+ + max_j [m (1 - gamma) + s_ji - s^a_ji]_+``."""
    rows = slice(None) if rows is None else rows
    pos = 2 * (margin * gamma + s_anchor.diagonal() - s.diagonal()).clamp_min(0)
    neg = (margin * (1 - gamma) + s - s_anchor).clamp_min(0)
    return pos[rows] + _hardest(neg, neg, rows)


def boost_rel(s: torch.Tensor, s_anchor: torch.Tensor, margin: float,
              rows: slice | None = None) -> torch.Tensor:
    """``BoostrelLoss`` per sample: ``max_j [m + (s^a_ii - s^a_ij) - (s_ii - s_ij)]_+`` over the
    texts ``j`` of image ``i`` plus the same over the images of text ``i``: the target's gap
    must exceed the anchor's gap by ``m`` (an adaptive margin)."""
    rows = slice(None) if rows is None else rows
    gap = s.diagonal()[:, None] - s
    gap_anchor = s_anchor.diagonal()[:, None] - s_anchor
    gap_t = s.diagonal()[None, :] - s
    gap_anchor_t = s_anchor.diagonal()[None, :] - s_anchor
    return _hardest((margin + gap_anchor - gap).clamp_min(0),
                    (margin + gap_anchor_t - gap_t).clamp_min(0), rows)


class BoostingMarginTransfer(Objective):
    """DBL's target-branch loss on two views, ``Views.embeddings = (images, texts)`` [B, D]
    (pair ``i`` matches), with the frozen anchor branch's embeddings of both views in
    ``Views.extras["teacher"]`` (a ``FrozenTeacher`` around the trained anchor model):
    ``birank(s) + alpha boost(s, s^a)`` per sample. ``alpha = 0`` trains the anchor branch
    itself (no teacher needed). Negatives are every other pair of the (gathered) batch."""

    requires = {"views": 2}
    consumes = frozenset()
    batch_coupled = True

    def __init__(self, margin: Annotated[float, Ge(0)] = 0.2, beta: Annotated[float, Ge(0)] = 1.0,
                 gamma: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 alpha: Annotated[float, Ge(0)] = 1.0,
                 boost: Annotated[str, one_of(("abs", "rel"))] = "abs", gather: Gather = "auto"):
        super().__init__()
        self.margin, self.beta, self.gamma, self.alpha = margin, beta, gamma, alpha
        self.boost, self.gather = boost, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        images, texts = (cls.upcast(z) for z in views.embeddings[:2])
        b = images.shape[0]
        anchor = None
        if self.alpha:
            if keys.TEACHER not in views.extras:
                raise RequirementError(f"{NAME}: alpha={self.alpha} needs the anchor branch's embeddings "
                                       f"of both views in Views.extras[{keys.TEACHER!r}] (a frozen "
                                       f"teacher); alpha=0 trains the anchor branch itself")
            anchor = tuple(cls.upcast(t.detach()) for t in check_teacher(NAME, views, 2))
        rows = slice(None)
        if resolve_gather(self.gather):
            images, texts = gather_with_grad(images), gather_with_grad(texts)
            if anchor is not None:
                anchor = tuple(gather_no_grad(t) for t in anchor)
            rows = slice(rank() * b, (rank() + 1) * b)
        s = scores(images, texts)
        per_sample = birank(s, self.margin, rows)
        logs = {"rank_loss": per_sample.detach().mean()}
        if anchor is not None:
            s_anchor = scores(*anchor).to(s.dtype)
            m = self.margin * self.beta
            extra = (boost_abs(s, s_anchor, m, self.gamma, rows) if self.boost == "abs"
                     else boost_rel(s, s_anchor, m, rows))
            logs["boost_loss"] = extra.detach().mean()
            per_sample = per_sample + self.alpha * extra
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        img, txt = (torch.randn(batch_size, 6, generator=generator).requires_grad_() for _ in range(2))
        teacher = tuple(torch.randn(batch_size, 6, generator=generator) for _ in range(2))
        return Views(embeddings=(img, txt), extras={keys.TEACHER: teacher}), Batch()


CARD = Card(
    name=NAME, kind="objective",
    title="Deep Boosting Learning: A Brand-new Cooperative Approach for Image-Text Matching",
    paper="arXiv:2404.18114",
    summary="Trains a target matching model to beat a frozen anchor model: the bidirectional "
            "hinge ranking loss plus a boosting loss asking for positive scores above, and "
            "negative scores below, the anchor's (abs), or for positive-negative gaps larger "
            "than the anchor's by a margin (rel).",
    formula="s_ij = cos(v_i, t_j); R_i = max_j [m + s_ij - s_ii]_+ + max_j [m + s_ji - s_ii]_+; "
            "abs: B_i = 2 [m beta gamma + s^a_ii - s_ii]_+ + max_j [m beta (1-gamma) + s_ij - s^a_ij]_+ "
            "+ max_j [m beta (1-gamma) + s_ji - s^a_ji]_+; rel: B_i = max_j [m beta + (s^a_ii - s^a_ij) "
            "- (s_ii - s_ij)]_+ + max_j [m beta + (s^a_ii - s^a_ji) - (s_ii - s_ji)]_+; "
            "L = mean_i (R_i + alpha B_i)",
    left_out="The matching models (SGRAF, VSE) and the Flickr30K / MSCOCO data are the model's and "
             "the data's part: scores are the cosines of the two views' embeddings (the code's "
             "cross-attention similarity networks score pairs differently). The code sums the "
             "hinge terms over the batch; here they are averaged (a 1/B scale, so that the "
             "gathered loss matches one process). The code's EMA-teacher variant (DINO-style "
             "boosting losses) is not implemented: use a frozen trained anchor model as the "
             "teacher.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BoostingMarginTransfer, card=CARD)
