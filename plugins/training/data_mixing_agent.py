"""A data mixing agent at use time: a small frozen policy maps the recent history of domain
mixtures and per-domain evaluation losses to the next mixture of training domains; the mixture
weights each sample's loss by its domain.

Yang, Liu, Ji, Li, Gong, Cheng & Yang, "Data Mixing Agent: Learning to Re-weight Domains for
Continual Pre-training" (arXiv:2507.15640): the agent's state (past mixtures and evaluation
feedback) and its mixture action, for per-sample losses with domain ids instead of LLM corpora;
the agent itself is trained offline elsewhere (the paper: conservative Q-learning on many
data-mixing trajectories) and loaded into :attr:`DataMixingAgent.policy`.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows
from sdk.types import Batch, check_ids

OWNER = "data_mixing_agent"


def domain_mixture_weights(domain: Tensor, mixture: Tensor) -> Tensor:
    """``w_i = pi_{d_i} / n_{d_i}`` ``[B]``, ``n_k`` the batch's count of domain ``k``: reduced as
    ``sum_i w_i l_i / sum_i w_i``, the loss is ``sum_k pi_k mean_{i in k} l_i`` renormalised over
    the domains present in the batch."""
    counts = torch.bincount(domain, minlength=mixture.numel()).to(mixture.dtype)
    return mixture[domain] / counts[domain]


class MixingPolicy(nn.Module):
    """``pi(s) = softmax(W_2 relu(W_1 s + b_1) + b_2)``: state ``s`` ``[..., H * 2K]`` (the last
    ``H`` windows of mixture and evaluation losses, oldest first), output a mixture ``[..., K]``."""

    def __init__(self, num_domains: int, history: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(history * 2 * num_domains, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_domains))

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state).softmax(-1)


class DataMixingAgent(Reweighter):
    """Per-sample weights ``pi_{d_i} / n_{d_i}`` (:func:`domain_mixture_weights`, detached) from
    ``Batch.domain`` and the current mixture ``pi`` ``[K]`` (uniform at first). Every window
    (e.g. ``T = 50`` optimizer steps) the training loop calls :meth:`observe` with the
    per-domain evaluation losses ``[K]``: the pair ``(pi, losses)`` joins the history (the last
    ``history`` windows, zero-filled at first) and ``pi <- policy(history)``, the frozen
    policy's mean action. ``policy`` holds the trained agent (``load_state_dict``); the
    mixture and the history are buffers (checkpointed). The untrained default policy is a
    random MLP: useful only once trained weights are loaded."""

    def __init__(self, num_domains: Annotated[int, Ge(2)] = 2,
                 history: Annotated[int, Ge(1)] = 3,
                 hidden: Annotated[int, Ge(1)] = 64):
        super().__init__()
        self.num_domains, self.history = num_domains, history
        self.policy = MixingPolicy(num_domains, history, hidden).requires_grad_(False)
        self.register_buffer("mixture", torch.full((num_domains,), 1.0 / num_domains))
        self.register_buffer("state", torch.zeros(history, 2 * num_domains))

    @torch.no_grad()
    def observe(self, eval_losses: Tensor) -> Tensor:
        """Push ``(pi, eval_losses)`` into the history; ``pi <- policy(history)``; returns ``pi``."""
        losses = torch.as_tensor(eval_losses, dtype=self.mixture.dtype, device=self.mixture.device)
        if losses.shape != (self.num_domains,):
            raise ShapeError(f"reweighter {OWNER!r}: eval_losses {list(losses.shape)} must be "
                             f"[{self.num_domains}] (one per domain)")
        if not bool(torch.isfinite(losses).all()):  # once per window, not per step: may sync
            raise ShapeError(f"reweighter {OWNER!r}: eval_losses must be finite, got "
                             f"{losses.tolist()}")
        window = torch.cat([self.mixture, losses])
        self.state = torch.cat([self.state[1:], window[None]])
        self.mixture = self.policy(self.state.flatten())
        return self.mixture

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        owner = f"reweighter {OWNER!r}"
        check_rows(owner, per_sample, batch)
        d = batch.domain
        if d is None:
            raise ShapeError(f"{owner} needs domain ids Batch.domain [{per_sample.shape[0]}], got None")
        if d.device.type == "cpu":
            check_ids(owner, "Batch.domain", d, self.num_domains)
        return domain_mixture_weights(d.long(), self.mixture.to(per_sample.device)).to(per_sample.dtype)

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: per-sample losses and domain ids."""
        return (torch.rand(batch_size, generator=g).requires_grad_(),
                Batch(domain=torch.arange(batch_size) % self.num_domains))


CARD = Card(
    name=OWNER, kind="reweighter",
    title="Data Mixing Agent: Learning to Re-weight Domains for Continual Pre-training",
    paper="arXiv:2507.15640",
    summary="A frozen policy (a softmax MLP) maps the last H windows of (domain mixture, "
            "per-domain eval losses) to the next mixture; each sample's loss is weighted by its "
            "domain's share of the mixture.",
    formula="pi_t = softmax(MLP([pi_{t-H}, e_{t-H}, ..., pi_{t-1}, e_{t-1}])) (zero-filled "
            "before H windows), pi_0 uniform; w_i = pi_{d_i} / n_{d_i}; loss = sum_i w_i l_i / "
            "sum_i w_i = sum_k pi_k mean_{i in k} l_i over the domains in the batch; H = 3",
    left_out="Training the agent is not here: the paper trains a small transformer agent "
             "offline with conservative Q-learning on a large corpus of random data-mixing "
             "trajectories of proxy LLMs with feedback from an evaluation environment (not the "
             "REINFORCE of the catalogue entry); load a trained policy's weights into `policy`. "
             "The LLM continual pre-training (math, code) is not here, and the caller computes "
             "the per-domain eval losses every window (the catalogue's T = 50 steps) and calls "
             "observe() (no callback). The MLP agent, its width 64 and H = 3 follow the "
             "catalogue entry: only the abstract and a summary of the paper could be reached.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DataMixingAgent, card=CARD)
