"""Bayesian Personalized Ranking: for a user ``u``, an item ``i`` the user interacted with and an
item ``j`` the user did not, maximise the likelihood that ``u`` prefers ``i`` to ``j``,
``-log sigmoid(s_ui - s_uj)``.

Rendle, Freudenthaler, Gantner & Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from
Implicit Feedback", UAI 2009 (arXiv:1205.2618): BPR-Opt (section 4.1) without its prior term; the
pairwise loss of the general collaborative-filtering models of SSLRec (arXiv:2308.05697).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def bpr_loss(positive: Tensor, negative: Tensor) -> Tensor:
    """Per triple ``-log sigmoid(s_ui - s_uj) = softplus(s_uj - s_ui)``: ``positive`` ``[B]``
    scores of the observed items, ``negative`` ``[B]`` or ``[B, K]`` scores of sampled unobserved
    items; with ``K`` negatives a row's loss is the mean over them (float32 at least). An infinite
    score gives NaN, not the 0 that ``softplus(-inf)`` would hide."""
    pos = positive.float() if positive.dtype in (torch.float16, torch.bfloat16) else positive
    neg = negative.to(pos.dtype)
    d = neg - pos if neg.dim() == 1 else neg - pos[:, None]
    per_triple = F.softplus(d) + 0 * d  # 0 * inf = NaN: a non-finite score is not a ranking
    return per_triple if neg.dim() == 1 else per_triple.mean(dim=1)


class BPRLoss(Objective):
    """BPR on ``Views.logits`` ``[B, 1 + K]``: column 0 is the score ``s_ui`` of the user's observed
    item, columns 1..K the scores ``s_uj`` of K sampled unobserved items (one triple per row when
    K = 1). ``per_sample`` is each row's mean over its negatives; the loss is their mean."""

    requires = {"logits": True}
    consumes = frozenset({Input.LOGITS})
    batch_coupled = False

    def forward(self, views: Views, batch: Batch) -> Loss:
        s = views.logits
        if s.dim() != 2 or s.shape[1] < 2:
            raise ShapeError("objective 'bpr_loss': Views.logits must be [B, 1 + K] scores (column 0 "
                             f"the observed item, K >= 1 unobserved ones), got {list(s.shape)}")
        if not s.is_floating_point():
            raise ShapeError(f"objective 'bpr_loss': Views.logits must be floating point, got {s.dtype}")
        per_sample = bpr_loss(s[:, 0], s[:, 1:])
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: one observed and three unobserved items' scores per row."""
        scores = torch.randn(batch_size, 4, generator=generator).requires_grad_()
        return Views(logits=scores), Batch(index=torch.arange(batch_size))


CARD = Card(
    name="bpr_loss", kind="objective",
    title="BPR: Bayesian Personalized Ranking from Implicit Feedback",
    paper="arXiv:1205.2618",
    summary="The pairwise ranking loss of implicit-feedback recommendation: each (user, observed "
            "item, unobserved item) triple is penalised by the log-likelihood that the user "
            "prefers the observed item, -log sigmoid(s_ui - s_uj).",
    formula="l(u, i, j) = -log sigmoid(s_ui - s_uj) = softplus(s_uj - s_ui); a row with K sampled "
            "negatives j_1..j_K: (1/K) sum_k l(u, i, j_k); loss = mean over rows",
    left_out="BPR-Opt's Gaussian prior lambda ||Theta||^2 (the optimizer's weight decay or an "
             "added L2 term), the scoring model (any encoder giving s_ui; matrix factorisation "
             "or LightGCN in the recipe recsys_ssl_recipes) and the uniform negative sampler "
             "(the caller draws j and passes its score).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(BPRLoss, card=CARD)
