"""Hydra / SimLAP: contrastive learning from arbitrary pairs through a learned feature filter.

Wu, Atito, Feng, Mo, Kittler & Awais, "Rethinking Positive Pairs in Contrastive Learning",
arXiv:2410.18200 (the authors' code calls the method SimLAP).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.contrastive import masked_logsumexp
from sdk.distributed import (
    Gather,
    gather_no_grad,
    gather_with_grad,
    rank,
    resolve_gather,
    sum_over_ranks,
    world_size,
)
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

PAIRINGS = ("arbitrary", "identical", "distinct")


def filtered_pair_loss(anchors: Tensor, keys: Tensor, gate: Tensor, anchor_class: Tensor,
                       positive_class: Tensor, key_class: Tensor, *, scale: Tensor | float,
                       alpha: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Per anchor, the sum over its positives of ``-log(e^{l_ip} / (e^{l_ip} + sum_n e^{l_in}))``
    [A] and its number of positives [A].

    ``l_ij = scale <g_i * g_i * a_i, k_j> - alpha <a_i, k_j>`` on L2-normalised anchors ``a``
    [A, D] and keys ``k`` [N, D] with the anchor's gate ``g_i`` [A, D]; the positives of
    anchor ``i`` are the keys of class ``positive_class[i]``, its negatives the keys of neither
    that class nor its own ``anchor_class[i]``."""
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    a = F.normalize(anchors.to(dtype), dim=-1)
    k = F.normalize(keys.to(dtype), dim=-1)
    logits = scale * ((a * gate.to(dtype).pow(2)) @ k.T)
    if not (isinstance(alpha, float) and alpha == 0.0):
        logits = logits - alpha * (a @ k.T)
    positive = positive_class[:, None] == key_class[None, :]
    negative = ~(positive | (anchor_class[:, None] == key_class[None, :]))
    log_neg = masked_logsumexp(logits, negative)
    pair = torch.logaddexp(logits, log_neg[:, None]) - logits
    return torch.where(positive, pair, torch.zeros_like(pair)).sum(dim=1), positive.sum(dim=1)


class ClassPairGate(nn.Module):
    """The feature filter ``g(c1, c2) = sigmoid(MLP((E[c1] + E[c2]) / 2))`` in ``(0, 1)^D``: a
    learned class embedding ``E`` [C, in_dim] averaged over the pair, then ReLU, BatchNorm,
    Linear(in_dim, mlp_dim), ReLU, BatchNorm, Linear(mlp_dim, D), as the authors' ``BasicGate``.
    The last layer takes the width ``D`` of the embeddings on first use."""

    def __init__(self, num_classes: int, in_dim: int, mlp_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, in_dim)
        self.hidden = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(in_dim), nn.Linear(in_dim, mlp_dim),
                                    nn.ReLU(), nn.BatchNorm1d(mlp_dim))
        self.weight = nn.UninitializedParameter()
        self.bias = nn.UninitializedParameter()

    def _materialise(self, width: int, device: torch.device) -> None:
        if isinstance(self.weight, nn.UninitializedParameter):
            fan_in = self.hidden[2].out_features
            self.weight.materialize((width, fan_in), device=device)
            self.bias.materialize((width,), device=device)
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's initialisation
            with torch.no_grad():
                self.weight.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)

    def forward(self, first: Tensor, second: Tensor, width: int) -> Tensor:
        self._materialise(width, first.device)
        h = self.hidden((self.embedding(first) + self.embedding(second)) / 2)
        return F.linear(h, self.weight, self.bias).sigmoid()

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        weight = state_dict.get(prefix + "weight")
        if isinstance(self.weight, nn.UninitializedParameter) and weight is not None:
            self._materialise(weight.shape[0], weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LearnedPositivePairs(Objective):
    """Hydra: every anchor is paired with a *positive class* (``pairing="arbitrary"``: the class
    of a random sample of the batch, as the authors' code draws it; ``"identical"``: its own
    class, supervised contrastive learning; ``"distinct"``: a random other class), and a gate
    :class:`ClassPairGate` of the class pair selects the dimensions on which the anchor is
    compared (:func:`filtered_pair_loss`): the keys of the positive class are its positives,
    those of neither class its negatives. The logit scale ``1 / temperature`` is learned (in log
    space) when ``learn_temperature``; ``alpha > 0`` subtracts ``alpha`` times the unfiltered
    cosine (a learned weight, as the code's option). The loss is the mean over all positive
    pairs of the global batch. Each view's embeddings are anchors against the next view's
    (cyclically), the directions averaged.

    The pairing and the keys couple the batch: ``gather`` ("auto": under DDP) draws the pairing
    over the global batch (from the global RNG, which the ranks share in the check) and uses
    every rank's keys. The gate's BatchNorm normalises over the anchors of the rank in training.
    """

    requires = {"views": 2, "targets": True}
    consumes = frozenset({Input.LABELS})
    batch_coupled = True

    def __init__(self, num_classes: Annotated[int, Ge(1), FromData("num_classes")] = 1000,
                 pairing: Annotated[str, one_of(PAIRINGS)] = "arbitrary",
                 temperature: Annotated[float, Gt(0)] = 0.1, learn_temperature: bool = True,
                 alpha: Annotated[float, Ge(0)] = 0.0, in_dim: Annotated[int, Ge(1)] = 512,
                 mlp_dim: Annotated[int, Ge(1)] = 1024, gather: Gather = "auto"):
        super().__init__()
        self.num_classes, self.pairing, self.gather = num_classes, pairing, gather
        log_scale = torch.tensor(math.log(1 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        if alpha > 0:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:
            self.alpha = 0.0
        self.gate = ClassPairGate(num_classes, in_dim, mlp_dim)

    def positive_classes(self, targets: Tensor) -> Tensor:
        """The positive class of every sample of ``targets`` (the global batch's class ids)."""
        if self.pairing == "identical":
            return targets
        if self.pairing == "arbitrary":
            return targets[torch.randperm(targets.shape[0], device=targets.device)]
        shift = torch.randint(1, max(self.num_classes, 2), targets.shape, device=targets.device)
        return (targets + shift) % self.num_classes

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        y = batch.targets
        check_ids(owner, "Batch.targets", y)
        b = y.shape[0]
        if self.training and b < 2:
            raise ShapeError(f"{owner}: the gate's BatchNorm needs at least 2 anchors per batch in "
                             f"training, got {b}")
        gathered = resolve_gather(self.gather)
        all_y = gather_no_grad(y) if gathered else y
        offset = rank() * b if gathered else 0
        positive_class = self.positive_classes(all_y)[offset:offset + b]
        zs = views.embeddings
        try:
            gate = self.gate(y, positive_class, zs[0].shape[1])
        except (IndexError, RuntimeError):
            check_ids(owner, "Batch.targets", y, self.num_classes)
            raise
        scale = self.log_scale.exp()
        totals, counts = [], []
        for v, anchors in enumerate(zs):
            keys = zs[(v + 1) % len(zs)]
            keys = gather_with_grad(keys) if gathered else keys
            total, count = filtered_pair_loss(anchors, keys, gate, y, positive_class, all_y,
                                              scale=scale, alpha=self.alpha)
            totals.append(total)
            counts.append(count)
        total, count = torch.stack(totals), torch.stack(counts)
        n_pairs = count.sum()
        if gathered:
            n_pairs = sum_over_ranks(n_pairs) / world_size()
        value = total.sum() / n_pairs.clamp_min(1)
        per_sample = (total / count.clamp_min(1)).mean(0)
        return Loss(value=value, per_sample=per_sample,
                    logs={"gate_activation": gate.detach().sum(1).mean(), "scale": scale.detach()})


CARD = Card(
    name="learned_positive_pairs", kind="objective",
    title="Rethinking Positive Pairs in Contrastive Learning (Hydra / SimLAP)",
    paper="arXiv:2410.18200",
    summary="Any pair of classes may be positive: a gate learned per class pair selects the "
            "subspace in which an anchor is pulled towards the samples of its (random) positive "
            "class and away from samples of neither class.",
    formula="g = sigmoid(MLP((E[y_i] + E[c_i]) / 2)); l_ij = s <g_i^2 * a_i, k_j> - alpha <a_i, "
            "k_j> (a, k L2-normalised, s = exp(log_scale)); P_i = {j: y_j = c_i}, "
            "N_i = {j: y_j not in {y_i, c_i}}; L = sum_i sum_{p in P_i} [log(e^{l_ip} + "
            "sum_{n in N_i} e^{l_in}) - l_ip] / sum_i |P_i|",
    left_out="The backbone and its 2-layer projector with LayerNorm, the Gumbel and stochastic-"
             "gate variants of the authors' code and its logging; the code contrasts the first "
             "view's anchors with the second view's keys only, here every view is anchors "
             "against the next one and the directions are averaged. The catalogue's 'all-ones "
             "filter equals the base loss' holds for the filter function (gate = 1, pairing "
             "'identical' gives a supervised contrastive loss in which each positive has its own "
             "denominator); the plugin's gate is a sigmoid and never exactly 1.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LearnedPositivePairs, card=CARD)
