"""Self-training: the model labels the unlabelled samples it is confident about, and those
pseudo-labels join the labelled ones as cross-entropy targets, round after round.

Amini, Feofanov, Pauletto, Hadjadj, Devijver & Maximov, "Self-Training: A Survey" (2022,
arXiv:2202.12040), Sec. 2-3: the pseudo-labelling loop with a fixed confidence threshold
(Algorithm 1), with the unlabelled term of Lee (2013)'s pseudo-label loss.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import distributed, keys
from sdk.card import Card
from sdk.classification import upcast
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Callback
from sdk.semisup import pseudo_labels
from sdk.types import Loss, check_ids


def pseudo_label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``sum_i [y~_i >= 0] CE(logits_i, y~_i) / U``: rows without a pseudo-label (``-1``) count
    as 0, the mean is over all ``U`` rows."""
    kept = labels >= 0
    ce = F.cross_entropy(upcast(logits), labels.clamp_min(0), reduction="none")
    return torch.where(kept, ce, 0.0).mean()


class SelfTraining(Callback):
    """Adds ``weight * pseudo_label_loss`` of the unlabelled batch's first view
    (``Views.extras[keys.UNLABELED][view]``) to every training loss (``after_loss``).

    The pseudo-labels of a round are fixed: ``labels`` ``[N]`` (``-1``: none), keyed by the
    unlabelled dataset's index. During a round every unlabelled batch's no-gradient prediction
    is recorded in ``pending`` where its confidence reaches ``threshold`` (``-1`` where it
    does not); every ``refresh_every`` optimizer steps ``pending`` becomes the next round's
    ``labels``. Both are checkpointed (``state_dict``) and all-gathered over the ranks by
    index. ``num_samples`` (``None``: the unlabelled loader's dataset size, at fit start)
    bounds the indices ``0 .. N-1``."""

    reads_unlabeled = True

    def __init__(self, threshold: Annotated[float, Interval(ge=0, le=1)] = 0.95,
                 weight: Annotated[float, Ge(0)] = 1.0,
                 refresh_every: Annotated[int, Ge(1)] = 100,
                 view: Annotated[int, Ge(0)] = 0,
                 num_samples: Annotated[int | None, Ge(1)] = None):
        self.threshold, self.weight, self.refresh_every = threshold, weight, refresh_every
        self.view, self.num_samples = view, num_samples
        self.labels: Tensor | None = None
        self.pending: Tensor | None = None

    def _size(self, n: int, device: torch.device) -> None:
        if self.labels is None or self.labels.numel() != n:
            self.labels = torch.full((n,), -1, dtype=torch.long, device=device)
            self.pending = self.labels.clone()
        else:
            self.labels, self.pending = self.labels.to(device), self.pending.to(device)

    def on_fit_start(self, state: Any) -> None:
        trainer = state.trainer
        loader = trainer.unlabeled_loader
        if loader is None:
            raise RequirementError("callback 'self_training' pseudo-labels unlabelled data: pass "
                                   "fit(..., unlabeled=loader)")
        n = self.num_samples
        if n is None:
            dataset = getattr(loader, "dataset", None)
            if dataset is None:
                raise RequirementError("callback 'self_training': give num_samples (the "
                                       "unlabelled loader has no dataset to size it from)")
            n = len(dataset)
        self._size(n, trainer.device)

    def after_loss(self, state: Any) -> None:
        extras = state.views.extras
        found = extras.get(keys.UNLABELED)
        if found is None:
            raise RequirementError(f"callback 'self_training' needs extras[{keys.UNLABELED!r}] "
                                   f"(fit(..., unlabeled=loader)), got none")
        if self.view >= len(found):
            raise RequirementError(f"callback 'self_training': view={self.view}, but "
                                   f"extras[{keys.UNLABELED!r}] holds {len(found)} views")
        z = found[self.view]
        index = extras.get(keys.UNLABELED_INDEX)
        if index is None:
            raise RequirementError(f"callback 'self_training' keys its pseudo-labels by "
                                   f"extras[{keys.UNLABELED_INDEX!r}] (items (x, y, index)), got None")
        if z.dim() != 2 or index.shape != (z.shape[0],):
            raise ShapeError(f"callback 'self_training': extras[{keys.UNLABELED!r}][{self.view}] "
                             f"{list(z.shape)} and extras[{keys.UNLABELED_INDEX!r}] "
                             f"{list(index.shape)} must be [U, C] and [U]")
        if index.device.type == "cpu":
            check_ids("callback 'self_training'", f"extras[{keys.UNLABELED_INDEX!r}]", index,
                      self.labels.numel())
        term = pseudo_label_loss(z, self.labels[index])
        confidence, predicted = pseudo_labels(z)
        with torch.no_grad():
            seen = torch.where(confidence >= self.threshold, predicted, -1)
            self.pending[distributed.gather_no_grad(index)] = distributed.gather_no_grad(seen)
        loss = state.loss
        state.loss = Loss(value=loss.value + self.weight * term, per_sample=loss.per_sample,
                          logs={**loss.logs, "self_training": term.detach(),
                                "pseudo_labelled": (self.labels[index] >= 0).float().mean()})

    def after_optimizer_step(self, state: Any) -> None:
        if state.step % self.refresh_every == 0:
            self.labels = self.pending.clone()

    def state_dict(self) -> dict[str, Any]:
        if self.labels is None:
            return {}
        return {"labels": self.labels.cpu(), "pending": self.pending.cpu()}

    def load_state_dict(self, state: Any) -> None:
        if not state:
            return
        device = self.labels.device if self.labels is not None else torch.device("cpu")
        self.labels = state["labels"].to(device)
        self.pending = state["pending"].to(device)


CARD = Card(
    name="self_training", kind="callback", title="Self-Training: A Survey",
    paper="arXiv:2202.12040",
    summary="Pseudo-labelling rounds: each unlabelled sample predicted with confidence >= "
            "threshold during a round is a cross-entropy target in the next round (weight "
            "lambda), the labelled objective unchanged. Needs fit(..., unlabeled=loader).",
    formula="L = L_objective + lambda (1/U) sum_i [y~_i != none] CE(y~_i, p(x_i)); y~_i = "
            "argmax p_r(x_i) if max p_r(x_i) >= threshold (else none), p_r the model's "
            "no-gradient prediction when x_i was last drawn in the previous round",
    left_out="The survey's loop retrains from scratch after each round and labels the whole "
             "unlabelled set with the round's final model; here the model keeps training, a "
             "round is refresh_every optimizer steps, and each sample's pseudo-label is the "
             "model's prediction when the sample was last drawn during the previous round (no "
             "extra pass over the data). Thresholds other than a fixed one (the survey's "
             "curriculum and top-k selections) are not offered; the unlabelled term is "
             "averaged over all U unlabelled rows.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SelfTraining, card=CARD)
