"""SCoRe: two-attempt reinforcement learning that teaches a language model to correct itself.

Kumar et al., "Training Language Models to Self-Correct via Reinforcement Learning", 2024
(arXiv:2409.12917). An episode is a first attempt ``y1 ~ pi(. | x)`` and a second attempt
``y2 ~ pi(. | x, y1, instruction)``, each rewarded ``r(y_i) in {0, 1}`` by a verifier.
Stage I maximises ``E[r(y2)] - beta2 KL(pi(. | x) || pi_ref(. | x))``: the second attempt improves
while the first stays near the base model. Stage II maximises
``E[sum_i r(y_i) - beta1 KL_i] + alpha E[r(y2) - r(y1)]``: both attempts, with a shaping bonus
``alpha (r(y2) - r(y1))`` on the second attempt that rewards turning a wrong first attempt into a
right one and penalises the reverse. Both are optimised by REINFORCE with the KL as a penalty on
each attempt's reward (its per-sample estimate ``sum_t log pi / pi_ref`` of the sampled tokens).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Interval

from sdk import keys, sequence
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views


def score_returns(r1: torch.Tensor, r2: torch.Tensor, kl1: torch.Tensor, kl2: torch.Tensor, *,
                  stage: int = 2, alpha: float = 10.0, beta1: float = 0.01,
                  beta2: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The returns (rewards to go) ``(G1, G2)`` ``[E]`` that weight ``log pi(y1)`` and
    ``log pi(y2)``, from the rewards and the sampled KL estimates of the two attempts:
    stage I ``G1 = r2 - beta2 kl1``, ``G2 = r2``; stage II ``G2 = r2 + alpha (r2 - r1) - beta1 kl2``,
    ``G1 = r1 - beta1 kl1 + G2``."""
    if stage == 1:
        return r2 - beta2 * kl1, r2
    second = r2 + alpha * (r2 - r1) - beta1 * kl2
    return r1 - beta1 * kl1 + second, second


class SCoRe(Objective):
    """SCoRe's REINFORCE surrogate on two-attempt episodes (:mod:`sdk.sequence`): rows ``2e`` and
    ``2e + 1`` of ``Views.logits`` ``[2E, T, V]`` and ``TOKEN_IDS`` are episode ``e``'s first and
    second attempts as the policy generated them (``TOKEN_MASK`` marks the attempt's tokens, the
    second row's context holding the first attempt), ``REWARD`` ``[2E]`` their rewards and
    ``REFERENCE_LOGPROBS`` the base model's token log-probabilities.
    ``L = -mean_e [G1 log pi(y1) + G2 log pi(y2)]`` (:func:`score_returns`, detached), whose
    gradient is the policy gradient of the stage's objective."""

    requires = {"logits": True, "extras": (keys.TOKEN_IDS, keys.REWARD, keys.REFERENCE_LOGPROBS)}
    consumes = frozenset({Input.LOGITS})
    batch_coupled = False  # an episode is one dataset item (sdk.sequence), never split over ranks

    def __init__(self, stage: Annotated[int, Interval(ge=1, le=2)] = 2, alpha: Annotated[float, Ge(0)] = 10.0,
                 beta1: Annotated[float, Ge(0)] = 0.01, beta2: Annotated[float, Ge(0)] = 0.1):
        super().__init__()
        self.stage, self.alpha, self.beta1, self.beta2 = stage, alpha, beta1, beta2

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        tok = sequence.read(owner, views, batch)
        logp = tok.sum(tok.logprobs)
        reward = sequence.extra(owner, batch, keys.REWARD, (logp.shape[0],)).float()
        with torch.no_grad():
            kl = tok.sum(tok.logprobs - sequence.reference_logprobs(owner, batch, tok))
        (lp1, lp2), (r1, r2), (kl1, kl2) = (sequence.pairs(owner, v) for v in (logp, reward, kl))
        g1, g2 = score_returns(r1, r2, kl1, kl2, stage=self.stage, alpha=self.alpha,
                               beta1=self.beta1, beta2=self.beta2)
        per_episode = -(g1 * lp1 + g2 * lp2)
        logs = {"reward_first": r1.mean(), "reward_second": r2.mean(),
                "kl_first": kl1.mean(), "kl_second": kl2.mean()}
        return Loss(value=per_episode.mean(), per_sample=sequence.per_pair_rows(per_episode),
                    logs=logs)

    @staticmethod
    def example_inputs(batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """``max(1, batch_size // 2)`` episodes of 6-token rows over 5 tokens: rewards 0/1, a
        reference policy's log-probabilities, the first attempt's context masked in the second."""
        b, t, v = 2 * max(1, batch_size // 2), 6, 5
        ids = torch.randint(0, v, (b, t), generator=g)
        ref = torch.log_softmax(torch.randn(b, t, v, generator=g), -1).gather(-1, ids[..., None])[..., 0]
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1::2, 1:3] = False
        reward = torch.tensor([0.0, 1.0]).repeat(b // 2)
        return (Views(logits=torch.randn(b, t, v, generator=g).requires_grad_()),
                Batch(index=torch.arange(b), extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask,
                                                     keys.REFERENCE_LOGPROBS: ref,
                                                     keys.REWARD: reward}))


CARD = Card(
    name="score_two_turn_rl", kind="objective",
    title="Training Language Models to Self-Correct via Reinforcement Learning",
    paper="arXiv:2409.12917",
    summary="SCoRe's two-attempt policy gradient: stage I improves the second attempt with the "
            "first held near the base model (KL beta2); stage II rewards both attempts with a "
            "shaping bonus alpha (r(y2) - r(y1)) for self-correction (KL beta1).",
    formula="kl_i = sum_t log pi(y_i,t)/pi_ref(y_i,t) (sampled, detached); stage I: G1 = r2 - beta2 "
            "kl1, G2 = r2; stage II: G2 = r2 + alpha (r2 - r1) - beta1 kl2, G1 = r1 - beta1 kl1 + G2; "
            "L = -mean_e [G1 log pi(y1|x) + G2 log pi(y2|x, y1)]",
    left_out="The LLM (Gemini) and the MATH / HumanEval tasks; generating the episodes on-policy "
             "and the verifier are the caller's (the episodes arrive as token rows with rewards). "
             "Plain REINFORCE with rewards to go and no baseline (the paper's on-policy variant is "
             "not specified beyond REINFORCE with a KL penalty); the KL enters as a per-sample "
             "reward penalty. Defaults: alpha = 10, beta1 = 0.01, beta2 = 10 beta1 = 0.1.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SCoRe, card=CARD)
