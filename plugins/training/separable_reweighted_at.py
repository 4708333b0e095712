"""Separable reweighted adversarial training (SRAT): class-reweighted cross-entropy on adversarial
examples plus a feature separation loss that pulls the adversarial features of one class together
and pushes the classes apart, so that upweighting the under-represented classes no longer costs
the well-represented ones as much.

Wang, Xu, Liu, Li, Thuraisingham & Tang, "Imbalanced Adversarial Training with Reweighting",
ICDM 2022 (arXiv:2107.13639): ``min_theta sum_i w_{y_i} CE(f(x'_i), y_i) + lambda L_sep(x'_i)``,
``x'_i`` the PGD example of ``x_i``; ``L_sep`` is here the supervised contrastive loss of Khosla et
al. on the adversarial examples' hidden representations (the abstract's "separable feature
space"; the paper's own form of the separation loss could not be checked).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk import classification as cls
from sdk import contrastive, keys
from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Reweighter
from sdk.reweighting import check_rows
from sdk.types import Batch, Loss, Views, check_ids


def class_weights(counts: Tensor, gamma: float = 1.0) -> Tensor:
    """``w_c = n_c^-gamma / mean_k n_k^-gamma`` (float32): inverse class frequency for
    ``gamma = 1``, uniform for ``gamma = 0``; the weights average 1 over the classes."""
    w = counts.double() ** -gamma
    return (w / w.mean()).float()


def separation_loss(z: Tensor, targets: Tensor, temperature: float = 0.1) -> tuple[Tensor, Tensor]:
    """Supervised contrastive loss per anchor and the mask of anchors with a positive::

        L_sep(i) = -1/|P(i)| sum_{p in P(i)} log exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t)

    ``z`` [N, D] (L2-normalised here), ``P(i)`` the other rows of ``i``'s class; an anchor
    alone in its class has no positive (``valid`` False, loss 0)."""
    zn = F.normalize(z.float(), dim=-1)
    logits = zn @ zn.T / temperature
    same = targets[:, None] == targets[None, :]
    not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return contrastive.info_nce(logits, same & not_self, ~same)


def counts_of(owner: str, class_counts: Any, labels: Any) -> Tensor | None:
    """The training class counts ``[C]`` (float64) from ``class_counts`` or the training
    ``labels``; ``None`` when neither is given. :class:`sdk.ConfigError` unless positive."""
    if class_counts is not None and labels is not None:
        raise ConfigError(f"{owner}: give class_counts or labels, not both", param="class_counts")
    if labels is not None:
        ids = torch.as_tensor(labels).reshape(-1)
        if ids.numel() == 0 or ids.is_floating_point() or int(ids.min()) < 0:
            raise ConfigError(f"{owner}: labels must be non-negative integer class ids, got "
                              f"{ids.dtype} with {ids.numel()} entries", param="labels")
        counts = torch.bincount(ids.long()).double()
    elif class_counts is not None:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    else:
        return None
    if counts.numel() < 2 or bool((counts <= 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ConfigError(f"{owner}: the training class counts must be positive and finite, one "
                          f"per class (at least 2), got {counts.tolist()}", param="class_counts")
    return counts


def _weight_buffer(owner: str, class_counts: Any, labels: Any, gamma: float) -> Tensor:
    counts = counts_of(owner, class_counts, labels)
    return torch.zeros(0) if counts is None else class_weights(counts, gamma)


def _class_weights_of(owner: str, w: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """The class weights ``[C]`` (ones when none were given), checked against ``num_classes``."""
    if not w.numel():
        return like.new_ones(num_classes, dtype=torch.float32)
    if w.shape[0] != num_classes:
        raise ShapeError(f"{owner}: the class counts give {w.shape[0]} classes, but Views.logits "
                         f"has {num_classes}")
    return w.to(like.device)


class SeparableReweightedAT(Objective):
    """SRAT's loss on the adversarial view (the logits ``Views.logits`` and the hidden
    representation ``Views.extras["features"][0]`` of the adversarial examples, e.g. from the
    ``sdk.adversarial.AdversarialExamples`` transform; ``Views.embeddings[0]`` stands for the
    features when the encoder publishes none)::

        L = 1/B sum_i w_{y_i} CE(f(x'_i), y_i) + lambda * mean_{i: P(i) != {}} L_sep(i)

    ``w`` from the training class counts (``class_counts`` or ``labels``, filled from the data;
    uniform without either) by :func:`class_weights`; ``L_sep`` by :func:`separation_loss`.
    ``per_sample`` is ``w_{y_i} CE_i + lambda L_sep(i)``. ``gather`` ("auto": under DDP) gathers
    logits, features and targets, so every rank computes the global batch's loss as one
    process would."""

    requires = {"views": 1, "logits": True, "targets": True}
    consumes = frozenset({Input.LOGITS, Input.LABELS, Input.FEATURES})
    batch_coupled = True

    def __init__(self, lam: Annotated[float, Ge(0)] = 1.0,
                 temperature: Annotated[float, Gt(0)] = 0.1,
                 gamma: Annotated[float, Ge(0)] = 1.0,
                 class_counts: tuple[float, ...] | None = None,
                 labels: Annotated[object | None, FromData("labels")] = None,
                 gather: Gather = "auto"):
        super().__init__()
        self.lam, self.temperature, self.gamma, self.gather = lam, temperature, gamma, gather
        self.register_buffer("class_weight", _weight_buffer("separable_reweighted_at", class_counts,
                                                            labels, gamma))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        logits = views.logits
        entry = views.extras.get(keys.FEATURES, views.embeddings[0])
        z = entry[0] if isinstance(entry, (tuple, list)) else entry  # the first view's features
        if not isinstance(z, Tensor):
            raise ShapeError(f"{owner}: Views.extras[{keys.FEATURES!r}] must hold feature tensors, "
                             f"got {type(z).__name__}")
        if logits.dim() != 2 or z.dim() != 2 or z.shape[0] != logits.shape[0]:
            raise ShapeError(f"{owner}: needs logits [B, C] and features [B, D] of one batch, got "
                             f"logits {list(logits.shape)} and features {list(z.shape)}")
        if not z.is_floating_point():
            raise ShapeError(f"{owner}: the features must be floating point, got {z.dtype}")
        t = cls.targets(owner, logits, batch.targets, soft=False)
        w = _class_weights_of(owner, self.class_weight, logits.shape[1], logits)
        y, b = t.ids, logits.shape[0]
        gathered = resolve_gather(self.gather)
        if gathered:
            logits, z, y = gather_with_grad(logits), gather_with_grad(z), gather_no_grad(y)
        ce = w[y] * F.cross_entropy(cls.upcast(logits), y, reduction="none")
        sep, valid = separation_loss(z, y, self.temperature)
        sep_mean = contrastive.masked_mean(sep, valid)
        value = ce.mean() + self.lam * sep_mean
        per_sample = ce + self.lam * sep
        if gathered:
            per_sample = per_sample[rank() * b:(rank() + 1) * b]
        return Loss(value=value, per_sample=per_sample,
                    logs={"weighted_ce": ce.mean().detach(), "separation": sep_mean.detach()})

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: logits, features (as the embedding) and class ids."""
        c = self.class_weight.numel() or 3
        logits = torch.randn(batch_size, c, generator=g).requires_grad_()
        feats = torch.randn(batch_size, 4, generator=g).requires_grad_()
        return (Views(embeddings=(feats,), logits=logits),
                Batch(targets=torch.arange(batch_size) % c))


class SeparableReweightedATWeights(Reweighter):
    """SRAT's class weights alone, for reweighted adversarial training with any per-sample
    loss: ``w_i = w_{y_i} / B`` with :func:`class_weights` of the training class counts
    (``class_counts`` or ``labels``, filled from the data; uniform without either), reduced as
    ``sum_i w_i l_i = 1/B sum_i w_{y_i} l_i`` (``normalize = False``: the paper's weighted sum,
    not a ratio). Do not combine it with the objective of the same name, which weights its
    cross-entropy itself."""

    normalize = False

    def __init__(self, gamma: Annotated[float, Ge(0)] = 1.0,
                 class_counts: tuple[float, ...] | None = None,
                 labels: Annotated[object | None, FromData("labels")] = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("class_weight", _weight_buffer("reweighter 'separable_reweighted_at'",
                                                            class_counts, labels, gamma))

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        owner = "reweighter 'separable_reweighted_at'"
        check_rows(owner, per_sample, batch)
        y = batch.targets
        if y is None:
            raise ShapeError(f"{owner} needs class ids Batch.targets [{per_sample.shape[0]}], got None")
        check_ids(owner, "Batch.targets", y)
        if not self.class_weight.numel():
            return per_sample.new_full(per_sample.shape, 1.0 / per_sample.shape[0]).detach()
        try:
            w = self.class_weight.to(per_sample.device)[y.long()]
        except IndexError:
            check_ids(owner, "Batch.targets", y, self.class_weight.shape[0])
            raise
        return (w / per_sample.shape[0]).to(per_sample.dtype)

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: per-sample losses and class ids."""
        c = self.class_weight.numel() or 3
        return (torch.rand(batch_size, generator=g).requires_grad_(),
                Batch(targets=torch.arange(batch_size) % c))


CARD = Card(
    name="separable_reweighted_at", kind="objective",
    title="Imbalanced Adversarial Training with Reweighting",
    paper="arXiv:2107.13639",
    summary="SRAT: class-reweighted cross-entropy on adversarial examples plus lambda times a "
            "supervised contrastive feature separation loss on their hidden representations, "
            "so that upweighting minority classes hurts the majority classes less.",
    formula="L = 1/B sum_i w_{y_i} CE(f(x'_i), y_i) + lambda mean_i L_sep(i), x' = PGD(x); "
            "L_sep(i) = -1/|P(i)| sum_{p in P(i)} log e^{z_i.z_p/t} / sum_{a != i} e^{z_i.z_a/t}, "
            "z = normalised features of x'; w_c = n_c^-gamma / mean_k n_k^-gamma; "
            "lambda = 1, t = 0.1, gamma = 1",
    left_out="The adversarial examples come from a transform (sdk.adversarial.AdversarialExamples, "
             "e.g. eps = 8/255, 10 steps of eps/4). Only the abstract could be consulted (no "
             "full text or authors' code was reachable): the separation loss as supervised "
             "contrastive, the weights n_c^-gamma with gamma = 1, lambda = 1 and t = 0.1 are the "
             "seed catalogue's reconstruction, not values read from the paper, and any pairing "
             "with other imbalance losses is not here. Anchors alone in "
             "their class within the batch have no positive and leave the separation mean. The paper's "
             "gain over reweighting alone does not reproduce on long-tailed digits with a small MLP: "
             "lambda = 1 lowers robust accuracy there, lambda = 0.1 keeps 2-5 points more majority "
             "and 3-6 points less minority robust accuracy than the weights alone (2 seeds).",
)

REWEIGHTER_CARD = Card(
    name="separable_reweighted_at", kind="reweighter",
    title="Imbalanced Adversarial Training with Reweighting",
    paper="arXiv:2107.13639",
    summary="SRAT's class weights: w_c proportional to n_c^-gamma (mean 1 over classes), as "
            "1/B-scaled sample weights for the weighted sum of reweighted adversarial training.",
    formula="w_i = w_{y_i} / B, w_c = n_c^-gamma / mean_k n_k^-gamma; loss = sum_i w_i l_i",
    left_out="The feature separation term (the objective of the same name holds the full SRAT "
             "loss, weights included).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SeparableReweightedAT, card=CARD)
    registry.add(SeparableReweightedATWeights, card=REWEIGHTER_CARD)
