"""ASFT: supervised fine-tuning on preference pairs through each response's absolute likelihood.

Wang, Sun, Hua & Fang, "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood", 2024
(arXiv:2409.10571): with the length-normalised likelihood ``p = exp(l)``, ``l`` the mean token
log-probability of a response, and no reference model, each pair (chosen ``w``, rejected ``l``)
costs ``-l_w + lam * (-log sigmoid(log odds p_w) - log sigmoid(-log odds p_l))``, which is
``-l_w + lam * (-log p_w - log(1 - p_l))``: the chosen response's likelihood is raised and the
rejected one's lowered, each on its own (no Bradley-Terry comparison between them).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge

from sdk import keys, sequence
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def asft_loss(chosen: torch.Tensor, rejected: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """Per-pair ASFT loss ``[P]`` from the length-normalised log-likelihoods ``l_w``, ``l_l`` ``[P]``
    (``<= 0``): ``-l_w + lam * (-l_w - log(1 - exp(l_l)))`` (``-log sigmoid(log odds p) = -log p``,
    ``-log sigmoid(-log odds p) = -log(1 - p)``, computed as ``-log(-expm1(l))``)."""
    return -chosen + lam * (-chosen - torch.log(-torch.expm1(rejected)))


class ASFT(Objective):
    """ASFT on preference pairs of sequences: ``Views.logits`` ``[2P, T, V]`` of a sequence model,
    ``Batch.extras[TOKEN_IDS]`` with row ``2p`` the chosen and ``2p + 1`` the rejected response
    of pair ``p`` and ``TOKEN_MASK`` marking the response tokens (:mod:`sdk.sequence`). The loss
    is the mean over the pairs; ``lam = 0`` is SFT on the chosen responses."""

    requires = {"logits": True, "extras": (keys.TOKEN_IDS,)}
    consumes = frozenset({Input.LOGITS})
    batch_coupled = False  # a pair is one dataset item (sdk.sequence), never split over ranks

    def __init__(self, lam: Annotated[float, Ge(0)] = 0.1):
        super().__init__()
        self.lam = lam

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        tok = sequence.read(owner, views, batch)
        chosen, rejected = sequence.pairs(owner, tok.mean(tok.logprobs))
        per_pair = asft_loss(chosen, rejected, self.lam)
        with torch.no_grad():
            logs = {"chosen_logp": chosen.mean(), "rejected_logp": rejected.mean()}
        return Loss(value=per_pair.mean(), per_sample=sequence.per_pair_rows(per_pair), logs=logs)

    @staticmethod
    def example_inputs(batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """``max(1, batch_size // 2)`` pairs of 6-token sequences over 7 tokens, the last token of
        every rejected response masked (padding)."""
        b, t, v = 2 * max(1, batch_size // 2), 6, 7
        logits = torch.randn(b, t, v, generator=g).requires_grad_()
        ids = torch.randint(0, v, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1::2, -1] = False
        return Views(logits=logits), Batch(index=torch.arange(b),
                                           extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask})


CARD = Card(
    name="asft_absolute_likelihood", kind="objective",
    title="ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood",
    paper="arXiv:2409.10571",
    summary="Preference fine-tuning without a reference model: each response's length-normalised "
            "likelihood p is pushed up (chosen) or down (rejected) on its own, through "
            "log sigmoid of its log odds, on top of the chosen response's NLL.",
    formula="l = mean_t log pi(y_t | x, y_<t) over the response tokens, p = exp(l); "
            "L = mean_pairs [ -l_w + lam * ( -log sigmoid(log p_w/(1-p_w)) "
            "- log sigmoid(-log p_l/(1-p_l)) ) ] = -l_w + lam * ( -l_w - log(1 - p_l) )",
    left_out="The LLM fine-tuning (Llama3 on UltraFeedback and HH-RLHF) and its MT-Bench / BLEU / "
             "ROUGE evaluation. The SFT term is the chosen response's length-normalised NLL (the "
             "token mean of each response, averaged over the pairs), so it equals the batch's token "
             "mean only when the responses have equal lengths; lam = 0.1 is ORPO's weight (the ASFT "
             "paper's own value could not be confirmed here).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ASFT, card=CARD)
