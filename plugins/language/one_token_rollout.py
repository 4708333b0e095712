"""One-token rollout (OTR): supervised fine-tuning as one-step policy gradient at every token.

Ming, Wu, Hu, He & Yu, "One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy
Gradient", 2025 (arXiv:2509.26313): each next-token prediction is a trajectory of length one. At
every target position ``K`` candidate tokens ``a_k`` are drawn from the current policy (without
gradient); the ground-truth token ``y`` rewards a candidate with ``1`` when ``a_k = y`` and with
``-beta`` otherwise, and the REINFORCE surrogate ``-(1/K) sum_k r_k log pi(a_k)`` is minimised:
sampled correct tokens are pushed up, sampled wrong ones down. Its expected gradient (temperature
1) is ``-(1 + beta) grad pi(y)``.
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


def rollout(logits: torch.Tensor, num_samples: int, temperature: float = 1.0) -> torch.Tensor:
    """``num_samples`` tokens per position drawn from ``softmax(logits / temperature)`` with
    replacement, long ``[..., K]`` (no gradient); ``temperature = 0``: the greedy token, ``K``
    times. Non-finite scores are drawn from as if finite (their log-probabilities carry the NaN
    into the loss)."""
    with torch.no_grad():
        z = torch.nan_to_num(logits.detach().float())
        if temperature == 0:
            return z.argmax(-1, keepdim=True).expand(*z.shape[:-1], num_samples)
        probs = torch.softmax(z / temperature, dim=-1).reshape(-1, z.shape[-1])
        draws = torch.multinomial(probs, num_samples, replacement=True)
        return draws.reshape(*z.shape[:-1], num_samples)


def otr_token_loss(logp: torch.Tensor, targets: torch.Tensor, samples: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """``-(1/K) sum_k r_k log pi(a_k)`` per position, ``r_k = 1`` if ``a_k = y`` else ``-beta``:
    ``logp`` ``[..., V]`` log-probabilities, ``targets`` ``[...]``, ``samples`` ``[..., K]``."""
    reward = torch.where(samples == targets[..., None], 1.0, -beta)
    return -(reward * logp.gather(-1, samples)).mean(-1)


class OneTokenRollout(Objective):
    """OTR on a sequence model's ``Views.logits`` ``[B, T, V]`` against
    ``Batch.extras[TOKEN_IDS]``, averaged over the counted targets of ``TOKEN_MASK``
    (:mod:`sdk.sequence`) as SFT's token NLL is; ``Loss.per_sample`` is each sequence's mean over
    its counted targets. Draws from torch's global generator."""

    requires = {"logits": True, "extras": (keys.TOKEN_IDS,)}
    consumes = frozenset({Input.LOGITS})
    batch_coupled = False

    def __init__(self, num_samples: Annotated[int, Ge(1)] = 16, beta: Annotated[float, Ge(0)] = 0.1,
                 temperature: Annotated[float, Ge(0)] = 1.0):
        super().__init__()
        self.num_samples, self.beta, self.temperature = num_samples, beta, temperature

    def forward(self, views: Views, batch: Batch) -> Loss:
        tok = sequence.read(f"objective {self.name!r}", views, batch)
        logp = torch.log_softmax(tok.logits.float(), dim=-1)
        samples = rollout(tok.logits, self.num_samples, self.temperature)
        per_token = otr_token_loss(logp, tok.targets, samples, self.beta)
        with torch.no_grad():
            hit = tok.token_mean((samples == tok.targets[..., None]).float().mean(-1))
        return Loss(value=tok.token_mean(per_token), per_sample=tok.mean(per_token),
                    logs={"rollout_accuracy": hit})

    @staticmethod
    def example_inputs(batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """Sequences of 5 tokens over 6, the last token of odd rows masked (padding)."""
        b, t, v = batch_size, 5, 6
        logits = torch.randn(b, t, v, generator=g).requires_grad_()
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1::2, -1] = False
        return Views(logits=logits), Batch(index=torch.arange(b), extras={
            keys.TOKEN_IDS: torch.randint(0, v, (b, t), generator=g), keys.TOKEN_MASK: mask})


CARD = Card(
    name="one_token_rollout", kind="objective",
    title="One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient",
    paper="arXiv:2509.26313",
    summary="SFT as one-step policy gradient per token: K candidate tokens drawn from the current "
            "policy are rewarded 1 when they equal the ground-truth token and -beta otherwise; "
            "sampled wrong tokens are pushed down, sampled right ones up.",
    formula="a_1..a_K ~ softmax(z_t / tau) (no gradient); r_k = 1[a_k = y_t] - beta 1[a_k != y_t]; "
            "L = mean_{counted t} -(1/K) sum_k r_k log softmax(z_t)_{a_k}; "
            "E[grad L] = -(1 + beta) grad pi(y_t) at tau = 1; tau = 0 (greedy) on positions the "
            "model predicts right is SFT's token NLL",
    left_out="LLM fine-tuning on math / code / general reasoning data and its benchmarks. The "
             "defaults (K = 16 candidates, beta = 0.1, tau = 1) are this implementation's "
             "(the paper's values could not be confirmed here); no baseline in the reward, as "
             "the paper's plain REINFORCE; temperature 0 (greedy) is an addition.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(OneTokenRollout, card=CARD)
