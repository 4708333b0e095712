"""CBNet: K copies of a staged backbone joined by dense higher-level composite connections.

Liang, Chu, Liu, Wang, Tang, Chu, Chen and Ling, "CBNet: A Composite Backbone Network
Architecture for Object Detection" (CBNetV2), IEEE TIP 2022, arXiv:2107.00420 (authors' code:
VDIGPKU/CBNetV2).

Backbones ``k = 1..K`` (assisting ones first, the last is the lead) have the same ``L`` stages
``F_l``; with ``x^k_0`` the input, the dense higher-level composition (DHLC) feeds stage ``l`` of
backbone ``k > 1`` with

    x^k_l = F^k_l(x^k_{l-1} + sum_{i >= l} g_{l,i}(x^{k-1}_i)),

``g_{l,i}`` a linear map (1x1 conv on feature maps, then nearest resizing to stage ``l``'s input)
and a batch norm kept in evaluation mode, its scale initialised to 0 (so the composite backbone
starts as the lead alone), shared by all backbones as in the authors' code. The head (the
backbone's last module, the detector's neck and head in the paper) runs on the lead's output.
Assistant supervision: in training, the same objective on the head applied to each assisting
backbone's output is added, ``L = L_lead + lambda sum_{k<K} L_k``, ``lambda = 0.5``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import mlp_layers
from sdk.types import Loss


class _Link(nn.Module):
    """``g_{l,i}``: linear (1x1 conv) + batch norm with zero scale, resized to ``size``."""

    def __init__(self, c_in: int, c_out: int, spatial: bool):
        super().__init__()
        self.proj = (nn.Conv2d(c_in, c_out, 1, bias=False) if spatial
                     else nn.Linear(c_in, c_out, bias=False))
        self.norm = nn.BatchNorm2d(c_out) if spatial else nn.BatchNorm1d(c_out)
        nn.init.zeros_(self.norm.weight)

    def forward(self, h: Tensor, size: torch.Size) -> Tensor:
        out = self.norm(self.proj(h))
        if out.dim() == 4 and out.shape[2:] != size:
            out = F.interpolate(out, size=tuple(size), mode="nearest")
        return out


class _Records:
    """The assisting outputs of this step's training forwards, ``(input, outputs)``; a copy of
    the encoder (a teacher) or a pickled one starts without any."""

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, list[Tensor]]] = []

    def __deepcopy__(self, memo: dict) -> _Records:
        return _Records()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _stages(backbone: nn.Module) -> nn.Sequential:
    seq = backbone if isinstance(backbone, nn.Sequential) else getattr(backbone, "module", None)
    if not isinstance(seq, nn.Sequential) or len(seq) < 2:
        raise ConfigError(f"composite_backbone: backbone must be an nn.Sequential of stages and a "
                          f"head (or an encoder wrapping one as .module), got "
                          f"{type(backbone).__name__}", param="backbone")
    return seq


class CompositeBackbone(Encoder):
    """CBNet (module docstring): ``forward(x) = head(features(x))``, ``features`` the lead
    backbone's last stage. ``backbone``: an ``nn.Sequential`` of stages followed by the head (or
    an encoder wrapping one as ``.module``); its stages are the first backbone's, the other
    ``copies - 1`` start as copies of them (the paper initialises every backbone from the same
    pretrained weights). Stage outputs are ``[B, C]`` or ``[B, C, H, W]``; ``input_shape`` (one
    sample's, default ``(in_dim,)``) is used once to find them. Without ``backbone``, an MLP of
    ``hidden_dims`` stages (Linear, BatchNorm, ReLU) and a linear head to ``out_dim`` is built."""

    def __init__(self, backbone: nn.Module | None = None,
                 in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 hidden_dims: tuple[int, ...] | list[int] = (128, 128, 128),
                 out_dim: Annotated[int, Ge(1)] = 128, copies: Annotated[int, Ge(2)] = 2,
                 assist_weight: Annotated[float, Ge(0)] = 0.5,
                 input_shape: Sequence[int] | None = None):
        super().__init__()
        if backbone is None:
            if not hidden_dims:
                raise ConfigError("composite_backbone: hidden_dims must give at least one stage",
                                  param="hidden_dims")
            widths = [in_dim, *hidden_dims]
            seq = nn.Sequential(*(mlp_layers([a, b, b])[:3] for a, b in zip(widths[:-1], widths[1:])),
                                nn.Linear(widths[-1], out_dim))
        else:
            seq = _stages(backbone)
        self.in_dim, self.assist_weight = in_dim, assist_weight
        self.input_shape = tuple(input_shape) if input_shape is not None else (in_dim,)
        first = nn.ModuleList(seq[:-1])
        self.backbones = nn.ModuleList([first, *(copy.deepcopy(first) for _ in range(copies - 1))])
        self.head = seq[-1]
        shapes = self._shapes(seq)                       # the input's, then each stage's output
        self.out_dim = getattr(backbone, "out_dim", None) or shapes[-1][0]
        stages = len(first)
        self.links = nn.ModuleList(
            nn.ModuleList(_Link(shapes[i + 1][0], shapes[l][0], len(shapes[l]) == 3)
                          for i in range(l, stages))
            for l in range(stages))
        self._records = _Records()
        self._batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                               for m in self.backbones.modules())

    def _shapes(self, seq: nn.Sequential) -> list[tuple[int, ...]]:
        modes = {m: m.training for m in seq.modules()}
        try:
            seq.eval()
            with torch.no_grad():
                h = torch.zeros(2, *self.input_shape, dtype=next(seq.parameters()).dtype)
                shapes = [tuple(h.shape[1:])]
                for stage in seq[:-1]:
                    h = stage(h)
                    if h.dim() not in (2, 4):
                        raise ConfigError(f"composite_backbone: stage outputs must be [B, C] or "
                                          f"[B, C, H, W], got {list(h.shape)}", param="backbone")
                    shapes.append(tuple(h.shape[1:]))
                shapes.append(tuple(seq[-1](h).shape[1:]))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if len({len(s) for s in shapes[:-1]}) != 1:
            raise ConfigError("composite_backbone: the input and every stage output must have the "
                              "same rank", param="backbone")
        return shapes

    def train(self, mode: bool = True) -> CompositeBackbone:
        super().train(mode)
        for m in self.links.modules():       # the authors keep the composite norms in eval mode
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def all_features(self, x: Tensor) -> list[Tensor]:
        """The last-stage output of every backbone (assisting ones first, the lead last)."""
        if tuple(x.shape[1:]) != self.input_shape or not x.is_floating_point():
            raise ShapeError(f"encoder 'composite_backbone': x must be a floating batch "
                             f"[B, {', '.join(map(str, self.input_shape))}], got {x.dtype} "
                             f"{list(x.shape)}")
        if self.training and x.shape[0] == 1 and self._batch_norm:
            raise ShapeError("encoder 'composite_backbone': x is a batch of one, which batch norm "
                             "in training mode cannot normalise")
        prev: list[Tensor] | None = None
        finals = []
        for stages in self.backbones:
            h, outs = x, []
            for l, stage in enumerate(stages):
                if prev is not None:
                    size = h.shape[2:]
                    h = h + sum(link(prev[l + n], size) for n, link in enumerate(self.links[l]))
                h = stage(h)
                outs.append(h)
            prev = outs
            finals.append(h)
        return finals

    def features(self, x: Tensor) -> Tensor:
        finals = self.all_features(x)
        if self.training and torch.is_grad_enabled():
            self._records.items = [*self._records.items[-7:], (x, finals[:-1])]
        return finals[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def assist_outputs(self, x: Tensor) -> list[Tensor]:
        """``head`` on each assisting backbone's output for input ``x`` (from this step's forward
        when it ran on ``x``)."""
        found = next((feats for rec_x, feats in self._records.items if rec_x is x), None)
        return [self.head(f) for f in (found if found is not None else self.all_features(x)[:-1])]

    def after_loss(self, state: Any) -> None:
        """Assistant supervision: ``loss += assist_weight * sum_k objective(assist_k views)``."""
        inputs = state.trainer.view_inputs
        if not self.assist_weight or not inputs:
            self._records.items = []
            return
        objective, views = state.trainer.objective, state.views
        per_view = [self.assist_outputs(x) for x in inputs]
        self._records.items = []
        extra = 0.0
        for k in range(len(self.backbones) - 1):
            embeddings = tuple(outs[k] for outs in per_view)
            extras = {key: v for key, v in views.extras.items() if key != keys.FEATURES}
            extra = extra + objective(views.evolve(embeddings=embeddings, extras=extras,
                                                   logits=embeddings[0] if views.logits is not None
                                                   else None), state.batch).value
        loss = state.loss
        logs = {**loss.logs, "cbnet/assist": extra.detach()}
        state.loss = Loss(value=loss.value + self.assist_weight * extra, per_sample=loss.per_sample,
                          logs=logs)


CARD = Card(
    name="composite_backbone", kind="encoder",
    title="CBNet: A Composite Backbone Network Architecture for Object Detection",
    paper="arXiv:2107.00420",
    summary="K copies of a staged backbone; every stage of a later backbone also receives the "
            "same-and-higher-level stage outputs of the previous one through zero-initialised "
            "linear+BN links (DHLC); the head runs on the lead; assistant supervision adds the "
            "objective on the assisting backbones' outputs.",
    formula="x^k_l = F^k_l(x^k_{l-1} + sum_{i>=l} BN(W_{l,i} x^{k-1}_i)), BN scale 0 at init; "
            "L = L_lead + 0.5 sum_{k<K} L_assist_k",
    left_out="Detectors (FPN neck, RPN/ROI heads), COCO and the Swin/ResNet pretrained "
             "backbones; the pruning of the first stages of the assisting backbones "
             "(cb_del_stages) and the shared stem; the head here is the backbone's last module "
             "(shared by the lead and the assisting branches, as the paper shares its neck and "
             "head). The assistant weight lambda = 0.5 follows the seed catalogue, not checked "
             "in the paper's text. Assistant supervision runs in the Trainer (after_loss), not in "
             "evaluation. Measured on digits (600 train, 3-stage MLPs of width 32, 80 Adam steps, "
             "3 seeds, outside the test suite): Dual + assistant supervision 95.4/97.2/97.0% vs "
             "the single backbone 94.7/97.1/96.9%, a small gain.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CompositeBackbone, card=CARD)
