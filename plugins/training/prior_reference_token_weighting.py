"""PRIOR's reference-model token weighting: a reference model trained without the conditioning
input (a text-only language model, for captions of images) scores each target; targets it finds
hard to predict are the ones that need the conditioning input, and weigh more in the main
model's loss.

Chen, Peng, Zhang & Ji, "Prioritizing Image-Related Tokens Enhances Vision-Language
Pre-Training" (PRIOR), arXiv:2505.08971. The weight ``w_i = (1 - P_ref(t_i | t_<i))^alpha``,
``alpha = 1``, normalised to mean 1 (here over the batch's samples), is a reading of the
abstract (tokens the text-only reference finds improbable weigh more), not the paper's own
equation, which could not be consulted.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.classification import upcast
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows
from sdk.types import Batch, check_ids

OWNER = "reweighter 'prior_reference_token_weighting'"


def importance_weights(reference_logits: Tensor, targets: Tensor, alpha: float = 1.0) -> Tensor:
    """``w_i = (1 - p_ref(y_i | x_i))^alpha`` ``[B]`` from the reference model's class scores
    ``[B, C]`` (softmax in float32 at least), detached."""
    with torch.no_grad():
        p = upcast(reference_logits.detach()).softmax(-1).gather(1, targets[:, None]).squeeze(1)
        return (1 - p).clamp_min(0) ** alpha


class PriorReferenceTokenWeighting(Reweighter):
    """Weights :func:`importance_weights` of ``Batch.extras[keys.REFERENCE_LOGITS]`` (a frozen
    reference model's class scores ``[B, C]``, from a model that does not see the conditioning
    input) at the class ids ``Batch.targets``; reduced as ``sum(w l) / sum(w)``, i.e. the mean
    of ``B w_i / sum_j w_j`` times the loss, PRIOR's weights normalised to mean 1. A batch whose
    every target the reference predicts with certainty (all ``w = 0``) gives a zero loss."""

    def __init__(self, alpha: Annotated[float, Gt(0)] = 1.0):
        super().__init__()
        self.alpha = alpha

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: losses, class ids of 4 classes and reference logits."""
        targets = torch.arange(batch_size) % 4
        logits = torch.randn(batch_size, 4, generator=generator)
        per_sample = torch.rand(batch_size, generator=generator) + 0.5
        return per_sample.requires_grad_(), Batch(targets=targets,
                                                  extras={keys.REFERENCE_LOGITS: logits})

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows(OWNER, per_sample, batch)
        b = per_sample.shape[0]
        logits = batch.extras.get(keys.REFERENCE_LOGITS)
        if logits is None:
            raise RequirementError(f"{OWNER} needs Batch.extras[{keys.REFERENCE_LOGITS!r}]: the "
                                   f"reference model's class scores [{b}, C]")
        if (not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != b
                or not logits.is_floating_point()):
            what = (f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, Tensor)
                    else type(logits).__name__)
            raise ShapeError(f"{OWNER}: Batch.extras[{keys.REFERENCE_LOGITS!r}] must be floating "
                             f"class scores [{b}, C], got {what}")
        targets = batch.targets
        if targets is None:
            raise RequirementError(f"{OWNER} needs class ids in Batch.targets [{b}]")
        check_ids(OWNER, "Batch.targets", targets)
        if targets.device.type == "cpu":  # a range check reads values: only where it is free
            check_ids(OWNER, "Batch.targets", targets, logits.shape[1])
        w = importance_weights(logits.to(per_sample.device), targets.to(per_sample.device), self.alpha)
        return w.to(per_sample.dtype)


CARD = Card(
    name="prior_reference_token_weighting", kind="reweighter",
    title="Prioritizing Image-Related Tokens Enhances Vision-Language Pre-Training",
    paper="arXiv:2505.08971",
    summary="PRIOR: a reference model trained without the conditioning input scores each target; "
            "the main model's loss weighs each target by (1 - p_ref)^alpha, normalised to mean 1, "
            "so targets that need the conditioning input (image-related tokens) count more.",
    formula="w_i = (1 - p_ref(y_i | x_i without the conditioning input))^alpha, alpha = 1; "
            "L = sum_i (B w_i / sum_j w_j) l_i / B",
    left_out="Only the abstract could be consulted (the authors' repository, Yangyi-Chen/PRIOR, "
             "holds no code): the weight's form (1 - p_ref)^alpha, alpha = 1 and the mean-1 "
             "normalisation are a reading of it, not the paper's importance-sampling equation. "
             "The vision-language models, captions and the text-only reference LLM: here the "
             "reference model's class scores come with the batch (Batch.extras"
             "['reference_logits']) and a sample stands for a token; the weights are normalised "
             "over the batch (per rank under DDP). The encoder-free LVLM "
             "setting and the scaling study.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PriorReferenceTokenWeighting, card=CARD)
