"""Masked modelling in feature space: from the visible tokens, predict a momentum teacher's deep
features of the hidden ones (Masked Scene Modeling's objective, on a token encoder).

Hermosilla, Stippel and Sick, "Masked Scene Modeling: Narrowing the Gap Between Supervised and
Self-Supervised Learning in 3D Scene Understanding", CVPR 2025 (arXiv:2504.06719).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.masking import (
    example_masked_inputs,
    masked_mean,
    random_mask,
    split_visible,
    visible,
)
from sdk.transformer import MaskedDecoder, masked_tokens
from sdk.types import Batch, Loss, Views

DISTANCES = ("cosine", "mse")


def masked_feature_loss(prediction: Tensor, target: Tensor, mask: Tensor,
                        distance: str = "cosine") -> tuple[Tensor, Tensor]:
    """``(value, per_sample)``: the distance between ``prediction [B, L, D]`` and the teacher's
    features ``target [B, L, D]`` (detached) per token, ``1 - cos(p, t)`` or ``mean_d (p - t)^2``,
    averaged over the hidden tokens only (``mask [B, L]``, 1 = hidden). In float32."""
    p, t = prediction.float(), target.detach().float()
    if distance == "cosine":
        err = 1 - torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=1e-8)
    else:
        err = (p - t).pow(2).mean(-1)
    return masked_mean(err, mask)


class MaskedFeatureReconstruction(Objective):
    """The student, a token encoder over the visible tokens (``vit`` / ``sequence_transformer``:
    ``Views.extras[keys.FEATURES]`` ``[B, 1 + K, embed_dim]``), is decoded by this objective's
    :class:`sdk.transformer.MaskedDecoder` (a learned mask token at every hidden position) into a
    prediction for every token; the target is the teacher's token features of the *whole* input,
    ``Batch.extras[keys.RECONSTRUCTION_TARGET]`` ``[B, L, target_dim]``, written with the mask
    by :meth:`masking` (bound to an ``ema`` teacher of the same encoder). Loss:
    :func:`masked_feature_loss` on the hidden tokens only."""

    requires = {"views": 1, "extras": (keys.FEATURES, keys.MASK, keys.IDS_RESTORE,
                                       keys.RECONSTRUCTION_TARGET)}
    batch_coupled = False

    def __init__(self, num_tokens: Annotated[int, Ge(2)] = 16, grid: tuple[int, ...] | list[int] = (4, 4),
                 embed_dim: Annotated[int, Ge(1)] = 64, target_dim: Annotated[int | None, Ge(1)] = None,
                 mask_ratio: Annotated[float, Interval(ge=0, lt=1)] = 0.75,
                 distance: Annotated[str, one_of(DISTANCES)] = "cosine",
                 decoder_dim: Annotated[int, Ge(4)] = 32, decoder_depth: Annotated[int, Ge(1)] = 2,
                 decoder_heads: Annotated[int, Ge(1)] = 4):
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if not grid or min(grid) < 1 or torch.Size(grid).numel() != num_tokens:
            raise ConfigError(f"masked_feature_reconstruction: grid {grid} does not hold "
                              f"num_tokens={num_tokens} tokens", param="grid")
        self.num_tokens, self.embed_dim, self.mask_ratio = num_tokens, embed_dim, mask_ratio
        self.target_dim, self.distance = target_dim or embed_dim, distance
        self.decoder = MaskedDecoder(embed_dim, self.target_dim, grid, dim=decoder_dim,
                                     depth=decoder_depth, heads=decoder_heads)

    def masking(self, teacher: Any) -> MaskedFeatureTargets:
        """The view transform that masks the input and writes the teacher's token features of the
        unmasked input as the target; ``teacher`` is the Trainer's ``ema`` teacher."""
        return MaskedFeatureTargets(_objective=self, teacher=teacher)

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'masked_feature_reconstruction'"
        tokens, ids_restore, mask, target = masked_tokens(
            owner, views, batch, width=self.embed_dim, length=self.num_tokens,
            target_dim=self.target_dim, target="the teacher's token features", target_param='target_dim')
        if not torch.is_autocast_enabled(tokens.device.type):
            tokens = tokens.to(self.decoder.embed.weight.dtype)
        prediction = self.decoder(tokens, ids_restore)
        value, per_sample = masked_feature_loss(prediction, target, mask, self.distance)
        return Loss(value=value, per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        return example_masked_inputs(batch_size, self.num_tokens, self.mask_ratio, self.embed_dim,
                                     self.target_dim, generator=generator, target="normal")


class MaskedFeatureTargets(Transform):
    """``(x, batch) -> (visible(x, ids_keep), batch + mask + target)``: a random mask of
    ``round(L * mask_ratio)`` tokens per sample (MAE's), and the teacher's token features of the
    whole ``x`` (``teacher.target.features(x)[:, 1:]``, without gradient) as
    :data:`sdk.keys.RECONSTRUCTION_TARGET`. Get it as ``objective.masking(teacher)``."""

    def __init__(self, _objective: MaskedFeatureReconstruction | None = None, teacher: Any = None):
        super().__init__()
        if _objective is None or teacher is None:
            raise ConfigError("masked_feature_targets: take it from its objective, "
                              "objective.masking(teacher)", param="teacher")
        object.__setattr__(self, "objective", _objective)
        object.__setattr__(self, "teacher", teacher)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        owner = "transform 'masked_feature_targets'"
        obj, target_net = self.objective, getattr(self.teacher, "target", None)
        if target_net is None or not callable(getattr(target_net, "features", None)):
            raise RequirementError(f"{owner} needs the teacher's copy of a token encoder "
                                   "(teacher.target.features); pass the teacher to the Trainer "
                                   "(it attaches the encoder when fit starts)")
        plain, _ = split_visible(x)
        with torch.no_grad():
            feats = target_net.features(plain)
        if feats.dim() != 3 or feats.shape[1] != obj.num_tokens + 1 or feats.shape[2] != obj.target_dim:
            raise ShapeError(f"{owner}: the teacher's features must be [B, 1 + {obj.num_tokens}, "
                             f"{obj.target_dim}] (class token first), got {list(feats.shape)}")
        mask = random_mask(plain.shape[0], obj.num_tokens, obj.mask_ratio, device=plain.device)
        extras = {**batch.extras, keys.MASK: mask.mask, keys.IDS_RESTORE: mask.ids_restore,
                  keys.RECONSTRUCTION_TARGET: feats[:, 1:].detach()}
        return visible(plain, mask.ids_keep), batch.evolve(extras=extras)


CARD = Card(
    name="masked_feature_reconstruction", kind="objective",
    title="Masked Scene Modeling: Narrowing the Gap Between Supervised and Self-Supervised "
          "Learning in 3D Scene Understanding (MSM)",
    paper="arXiv:2504.06719",
    summary="Encode the visible tokens, decode a prediction for every token from mask tokens, and "
            "match a momentum teacher's deep features of the hidden tokens (computed on the whole "
            "input), on hidden tokens only.",
    formula="p = dec(restore([enc(x_visible); mask tokens], ids_restore)); t = teacher(x)[1:] "
            "(stop-gradient); L = sum_il m_il d(p_il, t_il) / sum m; d = 1 - cos(p, t) or "
            "mean_d (p - t)^2",
    left_out="The 3D sparse-convolution U-Net, voxelised point clouds and scene datasets are not "
             "here; the paper reconstructs features level by level (bottom-up) across a "
             "hierarchical decoder and in a cross-view manner (targets from a second crop), while "
             "this generic form takes one level (the teacher's last token features) of one view. "
             "The paper's distance and mask ratio were not confirmed here: cosine and 0.75 are "
             "this module's defaults (mse is offered). The teacher is the ema teacher, bound in "
             "Python through `masking(teacher)` (a recipe cannot bind it).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MaskedFeatureReconstruction, card=CARD)
