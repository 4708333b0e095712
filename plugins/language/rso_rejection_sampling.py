"""RSO: preference pairs drawn by statistical rejection sampling from the optimal policy, fitted with
a normalised sigmoid or hinge loss.

Liu, Zhao, Joshi, Khalman, Saleh, Liu & Liu, "Statistical Rejection Sampling Improves Preference
Optimization", ICLR 2024 (arXiv:2309.06657). The KL-constrained optimal policy is
``pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta)``. Algorithm 1 samples it from ``N`` candidates
``y ~ pi_sft``: in each round every remaining candidate is accepted with probability
``exp((r(y) - r_max) / beta)``, ``r_max`` the largest reward among the remaining ones, until ``M``
are accepted. The accepted responses are paired and ranked by reward, and the policy is fitted on
the pairs with ``h = gamma (log pi(y_w)/pi_sft(y_w) - log pi(y_l)/pi_sft(y_l))`` and
``-log sigmoid(h)`` (sigmoid-norm) or ``max(0, 1 - h)`` (hinge-norm).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt

from sdk import keys, sequence
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views

LOSSES = ("sigmoid", "hinge")


def acceptance_probability(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp((r - max r) / beta)`` over the last dimension (the candidates of one prompt)."""
    return torch.exp((rewards - rewards.amax(-1, keepdim=True)) / beta)


def statistical_rejection_sampling(rewards: torch.Tensor, num_accept: int = 8, beta: float = 0.5,
                                   generator: torch.Generator | None = None) -> torch.Tensor:
    """RSO's Algorithm 1 for ``P`` prompts at once: ``rewards`` ``[P, N]`` of ``N`` candidates drawn
    from ``pi_sft`` -> the indices ``[P, M]`` of the ``M = num_accept`` accepted ones, in the order
    of acceptance. Each round passes over the remaining candidates in order, accepting each with
    :func:`acceptance_probability` among the remaining ones and stopping at ``M``; the best
    remaining candidate is always accepted, so ``M`` rounds suffice."""
    if rewards.dim() != 2 or not rewards.is_floating_point():
        raise ShapeError(f"rso_rejection_sampling: rewards must be floating [P, N], got "
                         f"{rewards.dtype} {list(rewards.shape)}")
    p, n = rewards.shape
    if not 1 <= num_accept <= n:
        raise ConfigError(f"rso_rejection_sampling: num_accept={num_accept} must lie in [1, N={n}]",
                          param="num_accept")
    if beta <= 0:
        raise ConfigError(f"rso_rejection_sampling: beta={beta} must be > 0", param="beta")
    rewards = rewards.double()
    remaining = torch.ones(p, n, dtype=torch.bool, device=rewards.device)
    order = torch.full((p, n), n, dtype=torch.long, device=rewards.device)  # n: not accepted
    taken = torch.zeros(p, 1, dtype=torch.long, device=rewards.device)
    for _ in range(num_accept):
        best = rewards.masked_fill(~remaining, -torch.inf).amax(-1, keepdim=True)
        u = torch.rand(p, n, generator=generator, dtype=torch.float64, device=rewards.device)
        accept = remaining & (u < torch.exp((rewards - best) / beta))
        rank = taken + accept.long().cumsum(-1)  # the acceptance count, candidate by candidate
        accept &= rank <= num_accept
        order = torch.where(accept, rank - 1, order)
        remaining &= ~accept
        taken = taken + accept.long().sum(-1, keepdim=True)
    return order.argsort(dim=-1, stable=True)[:, :num_accept]


def rank_pairs(accepted: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of consecutive accepted candidates ``(a_1, a_2), (a_3, a_4), ...`` ``[P, M // 2]``,
    ranked by reward: ``(chosen, rejected)`` indices, the first of a tie as chosen."""
    m = accepted.shape[1] // 2 * 2
    first, second = accepted[:, 0:m:2], accepted[:, 1:m:2]
    better = rewards.gather(1, first) >= rewards.gather(1, second)
    return torch.where(better, first, second), torch.where(better, second, first)


def rso_loss(h: torch.Tensor, loss: str = "sigmoid") -> torch.Tensor:
    """``-log sigmoid(h)`` (sigmoid-norm) or ``max(0, 1 - h)`` (hinge-norm), per pair."""
    return F.softplus(-h) if loss == "sigmoid" else torch.relu(1 - h)


class RSO(Objective):
    """RSO's fitting loss on preference pairs of sequences (:mod:`sdk.sequence`): ``Views.logits``
    ``[2P, T, V]``, rows ``2p`` / ``2p + 1`` the chosen / rejected response (e.g. from
    :func:`statistical_rejection_sampling` and :func:`rank_pairs`), ``TOKEN_MASK`` marking the
    response tokens and ``REFERENCE_LOGPROBS`` the SFT policy's token log-probabilities; a
    response's log-likelihood is the sum over its tokens. The loss is the mean over the pairs."""

    requires = {"logits": True, "extras": (keys.TOKEN_IDS, keys.REFERENCE_LOGPROBS)}
    consumes = frozenset({Input.LOGITS})
    batch_coupled = False  # a pair is one dataset item (sdk.sequence), never split over ranks

    def __init__(self, gamma: Annotated[float, Gt(0)] = 0.05,
                 loss: Annotated[str, one_of(LOSSES)] = "sigmoid"):
        super().__init__()
        self.gamma, self.loss = gamma, loss

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        tok = sequence.read(owner, views, batch)
        ratio = tok.sum(tok.logprobs - sequence.reference_logprobs(owner, batch, tok))
        chosen, rejected = sequence.pairs(owner, ratio)
        h = self.gamma * (chosen - rejected)
        per_pair = rso_loss(h, self.loss)
        with torch.no_grad():
            logs = {"margin": h.mean(), "pair_accuracy": (h > 0).float().mean()}
        return Loss(value=per_pair.mean(), per_sample=sequence.per_pair_rows(per_pair), logs=logs)

    @staticmethod
    def example_inputs(batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """``max(1, batch_size // 2)`` pairs of 5-token sequences over 6 tokens, a reference
        policy's log-probabilities, the rejected responses' last token masked (padding)."""
        b, t, v = 2 * max(1, batch_size // 2), 5, 6
        ids = torch.randint(0, v, (b, t), generator=g)
        ref = torch.log_softmax(torch.randn(b, t, v, generator=g), -1).gather(-1, ids[..., None])[..., 0]
        mask = torch.ones(b, t, dtype=torch.bool)
        mask[1::2, -1] = False
        return (Views(logits=torch.randn(b, t, v, generator=g).mul(4).requires_grad_()),
                Batch(index=torch.arange(b), extras={keys.TOKEN_IDS: ids, keys.TOKEN_MASK: mask,
                                                     keys.REFERENCE_LOGPROBS: ref}))


CARD = Card(
    name="rso_rejection_sampling", kind="objective",
    title="Statistical Rejection Sampling Improves Preference Optimization",
    paper="arXiv:2309.06657",
    summary="Preference pairs sampled from the optimal policy pi_sft exp(r / beta) by statistical "
            "rejection sampling of pi_sft's candidates (statistical_rejection_sampling, "
            "rank_pairs), fitted with a reference-normalised sigmoid (DPO) or hinge (SLiC) loss.",
    formula="sampling: per round accept each remaining y w.p. exp((r(y) - max_remaining r) / beta) "
            "until M accepted; pairs ranked by r; h = gamma [log pi(y_w)/pi_sft(y_w) - "
            "log pi(y_l)/pi_sft(y_l)] (sums over response tokens); L = mean_pairs -log sigmoid(h) "
            "(sigmoid-norm) or max(0, 1 - h) (hinge-norm)",
    left_out="T5 / PaLM policies and the Reddit TL;DR, AnthropicHH and CNN-DailyMail tasks; the "
             "pairwise reward-ranking model (rewards are given per candidate, pairs ranked by "
             "them); the rejection sampler is a function run on generated candidates before "
             "fitting (generation is the user's), not a Trainer sampler. Defaults: gamma = 0.05, "
             "beta = 0.5, M = 8 accepted (N = 64 candidates are the caller's), the sigmoid loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RSO, card=CARD)
