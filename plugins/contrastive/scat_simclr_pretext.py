"""NT-Xent with pretext-task regularisation (ScatSimCLR).

Kinakh, Taran, Voloshynovskiy, "ScatSimCLR: self-supervised contrastive learning with pretext
task regularization for small-scale datasets", ICCV 2021 workshops (arXiv:2108.13939).

A classifier ``g`` on the backbone features ``h`` of each augmented view predicts the
parameter ``t`` of the transformation applied to it (one of 4 rotations or one of 35 jigsaw
permutations); its cross-entropy is added to the contrastive loss with weight ``lambda``
(eq. 3; ``lambda = 0.3`` after ``lambda = 0`` for the first 40 epochs). The reference code
instead feeds a separate pretext image through the backbone and applies ``lambda`` from the
start; its jigsaw head has ``hidden=(512, 4096)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.contrastive import NTXent
from sdk.distributed import Gather
from sdk.errors import RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective, Sampler
from sdk.keys import FEATURES
from sdk.types import Batch, Loss, Views

TRANSFORM_KEY = "transform_id"


def pretext_loss(logits: Tensor, transform_ids: Tensor) -> Tensor:
    """``L_t = 1/M sum_i CE(t_i, g(h_i))`` over the ``M`` transformed inputs (eq. 2)."""
    return F.cross_entropy(logits.float(), transform_ids.long())


def scat_simclr_pretext_loss(z1: Tensor, z2: Tensor, *more_views: Tensor, pretext_logits: Tensor,
                             transform_ids: Tensor, temperature: float = 0.5,
                             pretext_weight: float = 0.3) -> Tensor:
    """``NT-Xent(z1, z2, ...) + pretext_weight * CE(pretext_logits, transform_ids)``."""
    contrastive = NTXent(temperature=temperature)(Views(embeddings=(z1, z2, *more_views))).value
    if pretext_weight == 0:
        return contrastive
    return contrastive + pretext_weight * pretext_loss(pretext_logits, transform_ids)


def _per_view_ids(ids: Any, n_views: int, batch_size: int) -> Tensor:
    """Transform ids as [V, B] from a [B] tensor (shared), a [V, B] tensor or V tensors [B]."""
    if isinstance(ids, (tuple, list)):
        ids = torch.stack(list(ids))
    if not isinstance(ids, Tensor):
        raise TypeError(f"Batch.extras[{TRANSFORM_KEY!r}]: expected a long tensor, got "
                        f"{type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids.expand(n_views, -1)
    if ids.shape != (n_views, batch_size):
        raise ShapeError(f"Batch.extras[{TRANSFORM_KEY!r}]: expected [B]={[batch_size]} or "
                         f"[V, B]={[n_views, batch_size]}, got {list(ids.shape)}")
    return ids.long()


class PretextHead(nn.Module):
    """``g``: per-tile ``Linear -> ReLU -> Dropout``, tiles concatenated, ``Linear -> ReLU ->
    Dropout``, ``Linear`` to the transformation classes (the reference rotation head with
    ``tiles=1``; its jigsaw head with ``tiles=9``)."""

    def __init__(self, feature_dim: int, num_transforms: int, hidden: Sequence[int],
                 dropout: float, tiles: int):
        super().__init__()
        self.tiles = tiles
        self.tile = nn.Sequential(nn.Linear(feature_dim, hidden[0]), nn.ReLU(), nn.Dropout(dropout))
        self.mix = nn.Sequential(nn.Linear(tiles * hidden[0], hidden[1]), nn.ReLU(),
                                 nn.Dropout(dropout))
        self.out = nn.Linear(hidden[1], num_transforms)

    def forward(self, h: Tensor) -> Tensor:
        if self.tiles == 1 and h.dim() == 2:
            h = h[:, None, :]
        if h.dim() != 3 or h.shape[1] != self.tiles:
            raise ShapeError(f"pretext head: expected features [B, {self.tiles}, D]"
                             f"{' or [B, D]' if self.tiles == 1 else ''}, got {list(h.shape)}")
        h = h.to(self.out.weight.dtype)
        return self.out(self.mix(self.tile(h).flatten(1)))


class ScatSimCLRPretext(Objective):
    """``L = NT-Xent(z_1..z_V) + lambda * 1/(V B) sum_{v,i} CE(t_{v,i}, g(h_{v,i}))``.

    ``h`` are the backbone features of each view (``Views.extras["features"]``: a tuple of
    ``[B, D]``, or ``[B, tiles, D]`` per jigsaw view); ``t`` are the ids of the transformation
    applied to each view (``Batch.extras["transform_id"]``: ``[B]`` shared by all views,
    ``[V, B]``, or one ``[B]`` tensor per view). The head ``g`` is owned by this objective and
    trained with it. ``lambda`` is 0 while ``trainer.epoch < warmup_epochs`` (set by the
    ``on_epoch_start`` event and checkpointed); outside a trainer it is ``pretext_weight``.
    """

    requires = {"views": 2, "extras": (FEATURES,)}
    consumes = NTXent.consumes | {Input.FEATURES}
    batch_coupled = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.5,
                 pretext_weight: Annotated[float, Ge(0)] = 0.3,
                 warmup_epochs: Annotated[int, Ge(0)] = 40, num_transforms: Annotated[int, Ge(1)] = 4,
                 feature_dim: Annotated[int, Ge(1)] = 512,
                 hidden: tuple[Annotated[int, Ge(1)], Annotated[int, Ge(1)]] = (512, 128),
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.5, tiles: Annotated[int, Ge(1)] = 1,
                 sampler: Sampler | None = None, gather: Gather = "auto"):
        super().__init__()
        self.contrastive = NTXent(temperature=temperature, sampler=sampler, gather=gather)
        self.pretext_weight = pretext_weight
        self.warmup_epochs = warmup_epochs
        self.head = PretextHead(feature_dim, num_transforms, hidden, dropout, tiles)
        self.epoch: int | None = None  # the trainer's epoch; None outside a trainer

    def on_epoch_start(self, state: State) -> None:
        self.epoch = int(state.epoch)

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]

    def current_weight(self) -> float:
        """``lambda`` now: 0 during the warm-up epochs, else ``pretext_weight``."""
        in_warmup = self.epoch is not None and self.epoch < self.warmup_epochs
        return 0.0 if in_warmup else self.pretext_weight

    def forward(self, views: Views, batch: Batch) -> Loss:
        loss = self.contrastive(views, batch)
        weight = self.current_weight()
        logs = {"nt_xent": loss.value.detach()}
        if weight == 0:
            return Loss(value=loss.value, per_sample=loss.per_sample, logs=logs)
        if TRANSFORM_KEY not in batch.extras:
            raise RequirementError(f"objective {self.name!r} needs Batch.extras[{TRANSFORM_KEY!r}] "
                                   "(the id of the transformation applied to each view)")
        features = views.extras[FEATURES]
        if len(features) != views.n_views:
            raise ShapeError(f"Views.extras['features']: {len(features)} tensors for "
                             f"{views.n_views} views")
        ids = _per_view_ids(batch.extras[TRANSFORM_KEY], views.n_views, views.batch_size)
        logits = self.head(torch.cat(list(features)))
        ce = F.cross_entropy(logits.float(), ids.reshape(-1), reduction="none")
        pretext = ce.mean()
        logs["pretext"] = pretext.detach()
        logs["pretext_accuracy"] = (logits.argmax(1) == ids.reshape(-1)).float().mean().detach()
        per_sample = loss.per_sample + weight * ce.view(views.n_views, -1).mean(0)
        return Loss(value=loss.value + weight * pretext, per_sample=per_sample, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        dim = self.head.tile[0].in_features
        tiles = self.head.tiles
        shape = (batch_size, dim) if tiles == 1 else (batch_size, tiles, dim)
        views = Views(embeddings=tuple(torch.randn(batch_size, 16, generator=generator)
                                       .requires_grad_() for _ in range(2)),
                      extras={FEATURES: tuple(torch.randn(*shape, generator=generator)
                                                .requires_grad_() for _ in range(2))})
        ids = torch.randint(self.head.out.out_features, (2, batch_size), generator=generator)
        return views, Batch(index=torch.arange(batch_size), extras={TRANSFORM_KEY: ids})


CARD = Card(
    name="scat_simclr_pretext", kind="objective",
    title="ScatSimCLR: self-supervised contrastive learning with pretext task regularization for "
          "small-scale datasets",
    paper="arXiv:2108.13939",
    summary="NT-Xent plus lambda times the cross-entropy of a pretext head predicting which "
            "rotation / jigsaw permutation was applied to each view, from its backbone features "
            "(Views.extras['features']) and Batch.extras['transform_id']; lambda = 0.3 after a "
            "40-epoch contrastive-only warm-up, temperature 0.5 (paper and reference config).",
    formula="L = NT-Xent(z_1..z_V; t=0.5) + lambda * 1/(VB) sum_{v,i} CE(t_{v,i}, g(h_{v,i})); "
            "lambda = 0 for epoch < warmup_epochs, else pretext_weight (0.3)",
    left_out="The ScatNet backbone (scattering transform + adapter network): kymatio 0.3.0, the "
             "only maintained package, installs without torch but its public import "
             "(kymatio.torch) fails with the SciPy pinned here (scipy.special.sph_harm was "
             "removed), so use any Encoder with features(); the generation of rotated / "
             "jigsaw-permuted views and their ids is a Transform's job. Differences from the "
             "reference code: it passes a separate pretext image (a rotated copy, or 9 jigsaw "
             "tiles) through the backbone, while here the head reads the features of the "
             "contrastive views themselves; its jigsaw head is hidden=(512, 4096) (pass that with "
             "tiles=9, num_transforms=35; the default (512, 128) is its rotation head); its "
             "trainer applies lambda from the first epoch (warmup_epochs=0).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ScatSimCLRPretext, card=CARD)
