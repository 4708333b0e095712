"""Class-balanced iterative pseudo-labels from zero-shot scores (GRIP): each class takes the ``k``
unlabelled samples it is most confident about among those predicted as that class; every round
the pseudo-labels are recomputed from the current model and ``k`` grows until the whole
unlabelled set is used.

Menghini, Delworth & Bach, "Enhancing CLIP with CLIP: Exploring Pseudolabeling for
Limited-Label Prompt Tuning", NeurIPS 2023 (arXiv:2306.01669), following the authors' code
(BatsResearch/menghini-neurips23-code: ``pseudolabel_top_k`` and the iterative strategy, with
``num_iter = 100 / STEP_QUANTILE`` rounds and ``t |U| / (num_iter C)`` pseudo-labels per class
in round ``t``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.classification import upcast
from sdk.cluster import dataset_index
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.semisup import unlabeled_index, unlabeled_views
from sdk.types import Loss, check_ids

OWNER = "zero_shot_pseudolabel"


def top_k_per_class(scores: Tensor, k: int) -> Tensor:
    """Pseudo-labels ``[N]`` (``-1``: none): sample ``i`` predicted ``c = argmax_j p_ij`` keeps
    ``c`` if ``p_ic`` is among the ``k`` highest ``p_.c`` of the samples predicted ``c`` (ties
    broken by position); a class predicted for fewer than ``k`` samples keeps them all."""
    p = upcast(scores).softmax(-1)
    n, c = p.shape
    labels = torch.full((n,), -1, dtype=torch.long, device=p.device)
    if k == 0:
        return labels
    predicted = p.argmax(-1)
    mine = F.one_hot(predicted, c).bool()
    ranked = torch.where(mine, p, -1.0)
    top = ranked.topk(min(k, n), dim=0)  # [k, C]
    chosen = top.values >= 0
    cls = torch.arange(c, device=p.device).expand_as(top.indices)
    labels[top.indices[chosen]] = cls[chosen]
    return labels


def per_class_budget(t: int, n: int, classes: int, rounds: int) -> int:
    """``k_t = floor(floor(t n / rounds) / C)``, capped at ``floor(n / C)`` (round ``t >= 1``)."""
    return min(int(t * n / rounds) // classes, n // classes)


class ZeroShotPseudolabel(Callback):
    """GRIP's iterative class-balanced pseudo-labels for ``fit(..., unlabeled=loader)`` (items
    ``(x, y, index)``; ``y`` is not read). Round ``t = 1 .. rounds``: at fit start and at every
    epoch end the unlabelled pool is scored (round 1: ``zero_shot`` ``[N, C]`` when given, the
    zero-shot model's scores in the pool's index order; else, and in later rounds, the model's
    own no-grad scores, ``trainer.embed``) and :func:`top_k_per_class` with
    ``k_t = floor(t N / rounds) / C`` replaces all pseudo-labels. ``after_loss`` adds ``weight``
    times the mean cross-entropy over the pseudo-labelled rows of unlabelled view ``view`` (0
    when none). The labels and the round count are checkpointed."""

    reads_unlabeled = True

    def __init__(self, rounds: Annotated[int, Ge(1)] = 10,
                 weight: Annotated[float, Ge(0)] = 1.0,
                 view: Annotated[int, Ge(0)] = 0,
                 zero_shot: Tensor | None = None):
        if zero_shot is not None and (not isinstance(zero_shot, Tensor) or zero_shot.dim() != 2
                                      or not zero_shot.is_floating_point()):
            what = (f"{zero_shot.dtype} {list(zero_shot.shape)}" if isinstance(zero_shot, Tensor)
                    else type(zero_shot).__name__)
            raise ShapeError(f"callback {OWNER!r}: zero_shot must be floating scores [N, C], "
                             f"got {what}")
        self.rounds, self.weight, self.view, self.zero_shot = rounds, weight, view, zero_shot
        self.labels: Tensor | None = None
        self.round = 0

    def refine(self, scores: Tensor, index: Tensor) -> Tensor:
        """The next round over the pool rows ``index`` ``[N]`` with scores ``[N, C]``."""
        if scores.dim() != 2 or index.shape != (scores.shape[0],) or scores.shape[0] == 0:
            raise ShapeError(f"callback {OWNER!r}: pool scores {list(scores.shape)} and index "
                             f"{list(index.shape)} must be [N, C] and [N], N > 0")
        n, c = scores.shape
        size = int(index.max()) + 1
        if self.labels is None or self.labels.numel() < size:
            self.labels = torch.full((size,), -1, dtype=torch.long, device=scores.device)
        self.round = min(self.round + 1, self.rounds)
        self.labels[index] = top_k_per_class(scores, per_class_budget(self.round, n, c, self.rounds))
        return self.labels

    def _refresh(self, trainer: Any) -> None:
        loader = trainer.unlabeled_loader
        if loader is None:
            raise RequirementError(f"callback {OWNER!r} pseudo-labels unlabelled data: pass "
                                   "fit(..., unlabeled=loader)")
        index = dataset_index(loader.dataset)
        if self.round == 0 and self.zero_shot is not None:
            scores = self.zero_shot.to(trainer.device)
            if scores.shape[0] != index.numel():
                raise ShapeError(f"callback {OWNER!r}: zero_shot has {scores.shape[0]} rows, the "
                                 f"unlabelled dataset {index.numel()} items")
        else:
            scores = trainer.embed(loader)
        self.refine(scores, index.to(scores.device))

    def on_fit_start(self, state: Any) -> None:
        if self.round == 0:
            self._refresh(state.trainer)

    def on_epoch_end(self, state: Any) -> None:
        self._refresh(state.trainer)

    def after_loss(self, state: Any) -> None:
        views = unlabeled_views(OWNER, state.views, n_views=self.view + 1)
        if views is None:
            return
        if self.labels is None:
            raise RequirementError(f"callback {OWNER!r} has no pseudo-labels: a round runs at "
                                   "fit start (fit(..., unlabeled=loader)) or call refine(...)")
        z = views[self.view]
        index = unlabeled_index(OWNER, state.views, z.shape[0])
        if index.device.type == "cpu":
            check_ids(f"callback {OWNER!r}", f"extras[{keys.UNLABELED_INDEX!r}]", index,
                      self.labels.numel())
        t = self.labels[index]
        kept = t >= 0
        ce = F.cross_entropy(upcast(z), t.clamp_min(0), reduction="none")
        term = torch.where(kept, ce, 0.0).sum() / kept.sum().clamp_min(1)
        loss = state.loss
        state.loss = Loss(value=loss.value + self.weight * term, per_sample=loss.per_sample,
                          logs={**loss.logs, OWNER: term.detach(),
                                "pseudo_labelled": kept.float().mean()})

    def state_dict(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        return {"labels": self.labels.cpu(), "round": self.round}

    def load_state_dict(self, state: Any) -> None:
        if state:
            self.labels, self.round = state["labels"].clone(), int(state["round"])


CARD = Card(
    name=OWNER, kind="callback",
    title="Enhancing CLIP with CLIP: Exploring Pseudolabeling for Limited-Label Prompt Tuning",
    paper="arXiv:2306.01669",
    summary="GRIP: class-balanced top-k pseudo-labels (per class, the k most confident samples "
            "predicted as it) from zero-shot scores, recomputed every round from the current "
            "model with k growing until the whole unlabelled set is pseudo-labelled.",
    formula="y~_i = c if c = argmax_j p_ij and p_ic is among the top k_t of {p_lc : argmax_j p_lj "
            "= c}, else none; k_t = floor(t N / R) / C, t = 1..R; L += weight mean_{i: y~_i} "
            "CE(p(x_i), y~_i); R = 10 (the authors' STEP_QUANTILE = 10)",
    left_out="CLIP, its prompt templates and prompt tuning (textual, visual, multimodal) are not "
             "here: the zero-shot scores are an input (zero_shot, [N, C]), else the model's own. "
             "The paper retrains the prompts from scratch on labelled plus pseudo-labelled data "
             "every round; here the model keeps training, a round is an epoch, and the "
             "pseudo-labelled term is added to the labelled objective with weight lambda = 1. "
             "The text-augmentation variant of the authors' code is not offered.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ZeroShotPseudolabel, card=CARD)
