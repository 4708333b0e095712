"""Diversify and Conquer (DAC): several classification heads that agree on labelled data and
disagree on unlabelled data; their disagreement flags the outliers of an open set.

Kong, Kim, Jung and Lee, "Diversify and Conquer: Open-set Disagreement for Robust
Semi-supervised Learning with Outliers", IEEE TNNLS 2025 (arXiv:2505.24443); the formulas follow
the authors' code (heejokong/DivCon: ``DiverseLoss`` and ``SoftWeightingHook``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.classification import UNKNOWN, log_probs, targets, upcast
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector, Objective
from sdk.types import Batch, Loss, Views

_NAME = "open_set_head_disagreement"


def split_heads(owner: str, logits: Tensor, num_heads: int) -> Tensor:
    """``[B, H * C]`` logits (head ``h`` in columns ``h C .. (h + 1) C - 1``, as the authors'
    ``view(-1, H, C)``) as ``[B, H, C]``, in float32 or better."""
    if logits.dim() != 2 or logits.shape[1] % num_heads or logits.shape[1] == 0:
        raise ShapeError(f"{owner}: logits must be [B, num_heads * C] = [B, {num_heads} * C], got "
                         f"{list(logits.shape)}")
    return upcast(logits).reshape(logits.shape[0], num_heads, -1)


def head_mutual_information(probs: Tensor, weight: Tensor | None = None) -> Tensor:
    """``[H, H]`` mutual information between the predictions of every two heads over the rows
    (weighted by ``weight`` [B], 0/1 for the unlabelled rows): with ``P_hg(d, e) = mean_b
    p_bh(d) p_bg(e)`` and marginals ``m_h = mean_b p_bh``, ``I_hg = sum_{d,e} P_hg log(P_hg /
    (m_h(d) m_g(e)))``."""
    w = probs.new_ones(probs.shape[0]) if weight is None else weight.to(probs.dtype)
    n = w.sum().clamp_min(1)
    marginal = torch.einsum("b,bhd->hd", w, probs) / n
    joint = torch.einsum("b,bhd,bge->hgde", w, probs, probs) / n
    tiny = torch.finfo(probs.dtype).tiny
    product = marginal[:, None, :, None] * marginal[None, :, None, :]
    return (joint * (joint.clamp_min(tiny).log() - product.clamp_min(tiny).log())).sum((-2, -1))


def diversity_loss(probs: Tensor, weight: Tensor | None = None) -> Tensor:
    """The mean of :func:`head_mutual_information` over the pairs ``h < g``: minimising it makes
    the heads' predictions on the unlabelled rows independent (the authors' ``DiverseLoss``)."""
    h = probs.shape[1]
    mi = head_mutual_information(probs, weight)
    upper = torch.triu(torch.ones(h, h, dtype=torch.bool, device=probs.device), diagonal=1)
    return mi[upper].mean()


def head_disagreement(probs: Tensor) -> Tensor:
    """``[B]``: ``d = 1 / (H^2 C) sum_{h,g,c} |p_hc - p_gc|``, the mean L1 distance between the
    heads' class probabilities over every ordered pair (the authors' ``get_disagree_scores``,
    mode "l1", before their ``exp(-d / T)``): higher = more anomalous."""
    return (probs[:, :, None] - probs[:, None]).abs().mean((1, 2, 3))


def _terms(owner: str, logits: Tensor, target: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(supervised, diversity, unlabelled fraction)`` of the rows given."""
    heads = split_heads(owner, logits, num_heads)
    t = targets(owner, heads[:, 0], target, soft=False, unknown=True)
    known = t.valid.to(heads.dtype)
    logp = log_probs(heads)  # [B, H, C]
    ce = -logp.gather(2, t.ids[:, None, None].expand(-1, num_heads, 1)).squeeze(2).mean(1)
    supervised = (ce * known).sum() / known.sum().clamp_min(1)
    return supervised, diversity_loss(logp.exp(), 1 - known), 1 - known.mean()


def open_set_head_disagreement_loss(logits: Tensor, target: Tensor, num_heads: int = 10,
                                    lambda_mi: float = 1.0) -> Tensor:
    """``(1/H) sum_h CE(head_h, y)`` over the labelled rows plus ``lambda_mi`` times the heads'
    pairwise mutual information over the unlabelled rows (``target == -1``)."""
    supervised, diverse, _ = _terms(f"objective {_NAME!r}", logits, target, num_heads)
    return supervised + lambda_mi * diverse


class OpenSetHeadDisagreement(Objective):
    """DAC's losses on ``H`` heads: ``Views.logits`` is ``[B, H * C]`` (head ``h`` in columns
    ``h C`` to ``(h + 1) C - 1``); ``Batch.targets`` holds class ids and ``-1`` for the
    unlabelled rows (:data:`sdk.classification.UNKNOWN`). The supervised term is each head's
    cross-entropy on the labelled rows, averaged over heads and rows; the diversity term is the
    mean pairwise mutual information of the heads' predictions over the unlabelled rows, a
    statistic of the batch: ``gather`` ("auto": under DDP) computes both over every rank's rows."""

    requires = {"logits": True, "targets": True}
    batch_coupled = True
    accepts_unknown = True

    def __init__(self, num_heads: Annotated[int, Ge(2)] = 10, lambda_mi: Annotated[float, Ge(0)] = 1.0,
                 gather: Gather = "auto"):
        super().__init__()
        self.num_heads, self.lambda_mi, self.gather = num_heads, lambda_mi, gather

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: logits of ``num_heads`` heads over 5 classes, every fourth row
        unlabelled."""
        logits = torch.randn(batch_size, self.num_heads * 5, generator=generator).requires_grad_()
        labels = torch.arange(batch_size) % 5
        return Views(logits=logits), Batch(targets=labels.masked_fill(labels % 4 == 3, UNKNOWN),
                                          index=torch.arange(batch_size))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        logits, target = views.logits, batch.targets
        targets(owner, split_heads(owner, logits, self.num_heads)[:, 0], target, soft=False,
                unknown=True)  # this rank's rows are checked before any gather
        if resolve_gather(self.gather):
            logits, target = gather_with_grad(logits), gather_no_grad(target)
        supervised, diverse, unlabelled = _terms(owner, logits, target, self.num_heads)
        return Loss(value=supervised + self.lambda_mi * diverse,
                    logs={"supervised": supervised.detach(), "mutual_information": diverse.detach(),
                          "unlabelled": unlabelled.detach()})


class HeadDisagreement(Detector):
    """``score([B, H * C] logits) = 1 / (H^2 C) sum_{h,g,c} |p_hc - p_gc|``; needs no fit."""

    inputs = "logits"

    def __init__(self, num_heads: Annotated[int, Ge(2)] = 10, temperature: Annotated[float, Gt(0)] = 1.0):
        super().__init__()
        self.num_heads, self.temperature = num_heads, temperature

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """For the conformance kit: ``(x_in, labels, x_test, x_out)`` over 5 classes, heads that
        agree on one class (in) or each pick a class at random (out)."""
        def rows(n: int, agree: bool) -> Tensor:
            shape = (n, 1) if agree else (n, self.num_heads)
            picked = torch.randint(0, 5, shape, generator=generator).expand(n, self.num_heads)
            noise = torch.randn(n, self.num_heads, 5, generator=generator)
            z = 4 * torch.nn.functional.one_hot(picked, 5) + noise
            return z.reshape(n, -1)

        return rows(64, True), torch.arange(64) % 5, rows(32, True), rows(32, False)

    def forward(self, logits: Tensor) -> Tensor:
        heads = split_heads(f"detector {self.name!r}", logits, self.num_heads)
        return head_disagreement((heads / self.temperature).softmax(-1))


_TITLE = "Diversify and Conquer: Open-set Disagreement for Robust Semi-supervised Learning with Outliers"
_UNKNOWN_ROWS = f"unlabelled rows carry Batch.targets = {UNKNOWN}"

CARD = Card(
    name=_NAME, kind="objective", title=_TITLE, paper="arXiv:2505.24443",
    summary="H classification heads on one representation: each head's cross-entropy on the "
            "labelled rows, plus the mean pairwise mutual information of the heads' predictions "
            f"on the unlabelled rows ({_UNKNOWN_ROWS}), which drives the heads to disagree where "
            "the labels say nothing, so that outliers are the rows they disagree on. H = 10 and "
            "lambda_mi = 1 as the authors' code.",
    formula="p_bh = softmax(z_bh); L = (1/|L|) sum_{b in L} (1/H) sum_h CE(z_bh, y_b) + "
            "lambda_mi mean_{h<g} I_hg, I_hg = sum_{d,e} P_hg(d,e) log(P_hg(d,e) / (m_h(d) m_g(e))), "
            "P_hg(d,e) = mean_{b in U} p_bh(d) p_bg(e), m_h = mean_{b in U} p_bh",
    left_out="The rest of DAC's training: the main classifier's FixMatch consistency on strong "
             "views, masked by an EMA of the min-max normalised joint agreement-confidence score "
             "with an Otsu threshold over the dataset; the heads' own pseudo-label consistency "
             "(loss_unk_reg); the open-set classifier distilled from a feature bank (loss_kd); the "
             "heads reading a detached projection of the backbone. Compose with cross_entropy or "
             "an SSL objective and weight with the detector's score for those. The catalogue's "
             "'metric' is the detector of the same name (a per-sample score; AUROC and FPR95 "
             "come from the OOD metrics).",
)

DETECTOR_CARD = Card(
    name=_NAME, kind="detector", title=_TITLE, paper="arXiv:2505.24443",
    summary="The heads' disagreement as an anomaly score: the mean absolute difference between "
            "the class probabilities of every two heads (the authors' 'l1' disagreement d, whose "
            "exp(-d / T_d) they use as an inlier weight). logits are [N, H * C].",
    formula="s(x) = 1/(H^2 C) sum_{h,g} sum_c |p_hc(x) - p_gc(x)|, p_h = softmax(z_h / T)",
    left_out="The authors' joint score (agreement times the maximum of the heads' mean "
             "probability, each min-max normalised over a bank of the whole unlabelled set and "
             "smoothed by an EMA over epochs); their 'kl' disagreement mode.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(OpenSetHeadDisagreement, card=CARD)
    registry.add(HeadDisagreement, card=DETECTOR_CARD)
