"""Discriminative fine-tuning: a generator is rewarded when a frozen retriever can pick its source
item among distractors from what it generated.

Dessì, Bevilacqua, Gualdoni, Carraz Rakotonirina, Franzon & Baroni, "Cross-Domain Image
Captioning with Discriminative Finetuning", CVPR 2023 (arXiv:2304.01662): a captioner samples a
caption ``c_i ~ pi(. | image_i)``; the frozen retriever (CLIP) scores it against the batch's
images, and the reward is its log-probability of retrieving the source,
``r_i = log softmax_j s(c_i, image_j) [i]``. The captioner is fine-tuned with REINFORCE and the
batch's mean reward as baseline: ``L = -mean_i (r_i - mean_j r_j) log pi(c_i | image_i)``.
"""

from __future__ import annotations

from typing import Annotated

import torch

from sdk import keys, sequence
from sdk.card import Card
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

BASELINES = ("mean", "none")


def retrieval_reward(scores: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``log softmax(scores_i)[source_i]`` ``[B]`` (float32, detached): the retriever's
    log-probability of picking each sequence's source among the ``M`` candidates."""
    with torch.no_grad():
        return torch.log_softmax(scores.detach().float(), -1).gather(1, source[:, None])[:, 0]


class DiscriminativeFinetune(Objective):
    """REINFORCE on sampled sequences (:mod:`sdk.sequence`: ``Views.logits`` ``[B, T, V]``,
    ``TOKEN_IDS`` the generated sequences, ``TOKEN_MASK`` their generated tokens) with the
    retrieval reward of ``Batch.extras[RETRIEVAL_SCORES]`` ``[B, M]`` and ``Batch.targets``
    (each sequence's source column). ``baseline="mean"``: the mean reward of the (global, with
    ``gather``) batch is subtracted."""

    requires = {"logits": True, "targets": True, "extras": (keys.TOKEN_IDS, keys.RETRIEVAL_SCORES)}
    consumes = frozenset({Input.LOGITS, Input.LABELS})
    batch_coupled = True  # the baseline is the batch's mean reward

    def __init__(self, baseline: Annotated[str, one_of(BASELINES)] = "mean", gather: Gather = "auto"):
        super().__init__()
        self.baseline, self.gather = baseline, gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        tok = sequence.read(owner, views, batch)
        b = tok.targets.shape[0]
        source = batch.targets
        check_ids(owner, "Batch.targets", source)
        scores = batch.extras[keys.RETRIEVAL_SCORES]
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != b \
                or not scores.is_floating_point():
            got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ShapeError(f"{owner}: extras[{keys.RETRIEVAL_SCORES!r}] must be floating "
                             f"[{b}, M], got {got}")
        try:
            reward = retrieval_reward(scores, source.long())
        except (RuntimeError, IndexError):
            check_ids(owner, "Batch.targets", source, scores.shape[1])
            raise
        advantage = reward
        if self.baseline == "mean":
            every = gather_no_grad(reward) if resolve_gather(self.gather) else reward
            advantage = reward - every.mean()
        per_sample = -advantage * tok.sum(tok.logprobs)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"retrieval_logp": reward.mean(),
                          "retrieval_accuracy": (scores.argmax(1) == source).float().mean()})

    @staticmethod
    def example_inputs(batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """Sequences of 4 tokens over 7, scored against 3 candidates."""
        b, t, v, m = batch_size, 4, 7, 3
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1::2, -1] = False
        return (Views(logits=torch.randn(b, t, v, generator=g).requires_grad_()),
                Batch(targets=torch.arange(b) % m, extras={
                    keys.TOKEN_IDS: torch.randint(0, v, (b, t), generator=g), keys.TOKEN_MASK: mask,
                    keys.RETRIEVAL_SCORES: 3 * torch.randn(b, m, generator=g)}))


CARD = Card(
    name="discriminative_finetune", kind="objective",
    title="Cross-Domain Image Captioning with Discriminative Finetuning",
    paper="arXiv:2304.01662",
    summary="REINFORCE fine-tuning of a generator with a frozen retriever's log-probability of "
            "picking the source item among distractors from the generated sequence as reward, "
            "the batch's mean reward as baseline.",
    formula="r_i = log softmax_j s(c_i, item_j)[source_i] (frozen retriever, detached); "
            "L = -mean_i (r_i - mean_k r_k) sum_t log pi(c_i,t | item_i, c_i,<t)",
    left_out="The captioner (ClipCap) and CLIP itself: sampling the sequences and the retriever's "
             "scores are the caller's (Batch.extras[RETRIEVAL_SCORES]); the COCO / Conceptual "
             "Captions / nocaps evaluation. The mean baseline includes each sample's own reward, "
             "as a batch mean does, which scales the expected gradient by 1 - 1/B.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DiscriminativeFinetune, card=CARD)
