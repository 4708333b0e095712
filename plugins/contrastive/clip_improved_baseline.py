"""CLIP's symmetric image–text InfoNCE with a learnable temperature and label smoothing of the
contrastive targets: the loss of the improved CLIP training recipe (CLIP🚀).

Fini, Astolfi, Romero-Soriano, Verbeek and Drozdzal, "Improved baselines for vision-language
pre-training", TMLR 2023, arXiv:2305.08675 (authors' code: facebookresearch/clip-rocket).
CLIP: Radford et al., ICML 2021, arXiv:2103.00020.

With ``s = exp(log_scale)`` (CLIP initialises ``log_scale = log(1 / 0.07)`` and clips the scale at
100: after every optimizer step ``log_scale`` is clamped to ``[0, log 100]``, as the authors' code
does) and cosine similarities of the two views (image ``a``, text ``b``)::

    L = 1/(2B) sum_i [ CE_eps(s cos(a_i, b_.), i) + CE_eps(s cos(b_i, a_.), i) ]

``CE_eps``: cross-entropy against ``(1 - eps) onehot(i) + eps / B`` (the recipe's ``eps = 0.1``;
``eps = 0`` is CLIP's loss).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Gt, Interval
from torch import nn

from sdk.card import Card
from sdk.contrastive import cross_modal_info_nce
from sdk.distributed import Gather
from sdk.errors import ConfigError, RequirementError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


class ClipImprovedBaseline(Objective):
    """Symmetric InfoNCE between views ``pair`` (module docstring), e.g. the image tower's and the
    text tower's outputs of a ``multi_tower`` encoder; other views are left to other terms (a
    multi-level sum ``sum_l clip(pair=(l, L))``). ``temperature``: the initial temperature
    (0.07), learned when ``learn_temperature`` (as ``log_scale``, an objective parameter the
    Trainer optimises), its scale ``1 / t`` kept at most ``max_scale`` (100) after every
    optimizer step. ``label_smoothing``: ``eps`` of the targets (0.1 in the paper's recipe)."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.07,
                 learn_temperature: bool = True,
                 max_scale: Annotated[float, Gt(1)] = 100.0,
                 label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.1,
                 pair: tuple[int, int] = (0, 1),
                 gather: Gather = "auto"):
        super().__init__()
        if 1 / temperature > max_scale:
            raise ConfigError(f"clip_improved_baseline: the initial scale 1/temperature = "
                              f"{1 / temperature:g} exceeds max_scale = {max_scale:g}",
                              param="temperature")
        if pair[0] == pair[1] or min(pair) < 0:
            raise ConfigError(f"clip_improved_baseline: pair must name two different views, got "
                              f"{tuple(pair)}", param="pair")
        log_scale = torch.tensor(math.log(1 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale, self.label_smoothing = max_scale, label_smoothing
        self.pair, self.gather = tuple(pair), gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        if max(self.pair) >= views.n_views:
            raise RequirementError(f"objective {self.name!r} contrasts views {self.pair}, got "
                                   f"{views.n_views} views")
        scale = self.log_scale.exp()
        loss = cross_modal_info_nce(views, batch, scale, pair=self.pair,
                                    label_smoothing=self.label_smoothing, gather=self.gather)
        return Loss(value=loss.mean(), per_sample=loss, logs={"scale": scale.detach()})

    def after_optimizer_step(self, state: State) -> None:
        """Clip the learned scale to ``[1, max_scale]`` (CLIP's clamp of ``log_scale``)."""
        if isinstance(self.log_scale, nn.Parameter):
            with torch.no_grad():
                self.log_scale.clamp_(0.0, math.log(self.max_scale))


CARD = Card(
    name="clip_improved_baseline", kind="objective",
    title="Improved baselines for vision-language pre-training (CLIP🚀)",
    paper="arXiv:2305.08675",
    summary="CLIP's symmetric image-text InfoNCE between two views from different encoders "
            "(multi_tower), learnable temperature (init 0.07, scale clipped at 100) and label "
            "smoothing 0.1 of the contrastive targets, as in the paper's improved CLIP recipe.",
    formula="L = 1/(2B) sum_i [CE_eps(s cos(a_i, b_.), i) + CE_eps(s cos(b_i, a_.), i)], "
            "s = exp(log_scale) learned, clamped to [1, 100] after each step; "
            "CE_eps: targets (1 - eps) onehot + eps / B",
    left_out="The rest of the paper's recipe lives in the data and encoders, not this loss: "
             "stronger image augmentations and text augmentations (EDA: synonym replacement, "
             "random swap and deletion, stop-word removal), dropout in the text transformer, "
             "the MLP projectors and the separate temperature (init 0.1) of the augmented-view "
             "pairs; the text transformer, ViT/ResNet image encoders and the web-scale "
             "image-text data (CC3M, CC12M, YFCC15M) are not here. In the authors' code the "
             "smoothing applies to the augmented views' pairs while the weakly augmented pair "
             "keeps hard targets; here it applies to the pair this term contrasts (compose two "
             "terms for both).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ClipImprovedBaseline, card=CARD)
