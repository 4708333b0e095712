"""GenView's quality-driven contrastive loss weights: a frozen encoder's patch tokens of the two
views are split into a soft foreground and background by their projection on a fixed principal
direction; a pair whose foregrounds agree more than its backgrounds is a good positive pair and
weighs more in the contrastive loss.

Li, Yang, Li, Wu, Yu, Ghanem & Zhang, "GenView: Enhancing View Quality with Pretrained Generative
Model for Self-Supervised Learning", ECCV 2024 (arXiv:2403.12003), Sec. 3.3, following the
authors' code (xiaojieli0903/genview: ``make_foreground_softmask``, ``aggregate_feature``,
``calculate_sim``, ``calculate_weight``).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import NotFittedError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Reweighter
from sdk.reweighting import check_rows, global_softmax
from sdk.state import ResizableBuffers
from sdk.types import Batch

OWNER = "reweighter 'genview_quality_weight'"


def principal_direction(tokens: Tensor) -> Tensor:
    """The first principal component ``u`` ``[D]`` of reference tokens ``[..., D]`` (the top
    eigenvector of their covariance), oriented so that fewer than half of the tokens project
    above their image's midpoint ``(min + max) / 2`` (the foreground is the smaller part)."""
    if tokens.dim() < 2 or not tokens.is_floating_point() or tokens.shape[-1] < 1:
        raise ShapeError(f"{OWNER}: reference tokens must be floating [N, P, D] or [M, D], got "
                         f"{tokens.dtype} {list(tokens.shape)}")
    flat = tokens.detach().double().reshape(-1, tokens.shape[-1])
    centred = flat - flat.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred / max(flat.shape[0] - 1, 1))
    u = vectors[:, -1]
    images = tokens.detach().double().reshape(-1, *tokens.shape[-2:]) if tokens.dim() > 2 else flat[None]
    proj = images @ u
    mid = (proj.amax(-1, keepdim=True) + proj.amin(-1, keepdim=True)) / 2
    if bool((proj > mid).double().mean() > 0.5):
        u = -u
    return u.float()


def soft_masks(tokens: Tensor, direction: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Foreground and background maps ``[B, P]``: ``m = tokens @ u`` min-max normalised per image
    (``(m - min) / (max - min + eps)``), ``fg = m``, ``bg = 1 - m``, each divided by its sum
    (``+ eps``)."""
    m = tokens @ direction.to(tokens.dtype)
    low, high = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
    fg = (m - low) / (high - low + eps)
    bg = 1 - fg
    return fg / (fg.sum(1, keepdim=True) + eps), bg / (bg.sum(1, keepdim=True) + eps)


def pair_quality(tokens_1: Tensor, tokens_2: Tensor, direction: Tensor,
                 distance: str = "cosine") -> Tensor:
    """``q_i = s(fg^1_i, fg^2_i) - s(bg^1_i, bg^2_i)`` ``[B]`` with pooled ``fg_i = sum_p fg_p T_p``
    (likewise ``bg``) and ``s`` the cosine similarity (``"dot"``: the inner product)."""
    pooled = []
    for t in (tokens_1, tokens_2):
        fg, bg = soft_masks(t, direction)
        pooled.append((torch.einsum("bp,bpd->bd", fg, t), torch.einsum("bp,bpd->bd", bg, t)))
    (f1, b1), (f2, b2) = pooled
    if distance == "cosine":
        f1, b1, f2, b2 = (F.normalize(v, dim=-1) for v in (f1, b1, f2, b2))
    return (f1 * f2).sum(-1) - (b1 * b2).sum(-1)


def quality_weights(tokens_1: Tensor, tokens_2: Tensor, direction: Tensor, *, gamma: float = 1.0,
                    distance: str = "cosine") -> Tensor:
    """One process's weights ``w = B softmax(gamma q)`` (mean 1, detached), as the authors'
    ``exp(gamma q) / sum exp(gamma q) * B``."""
    q = pair_quality(tokens_1.detach().float(), tokens_2.detach().float(), direction, distance)
    return q.shape[0] * torch.softmax(gamma * q, 0)


class GenViewQualityWeight(ResizableBuffers, Reweighter):
    """Weights the per-pair contrastive losses by ``softmax(gamma q)`` over the global batch
    (``normalize = False``: the loss is ``sum_i w_i l_i``, i.e. the authors' mean of ``B softmax
    (gamma q)_i l_i``; under DDP each rank keeps its rows times the world size).

    Reads the frozen encoder's patch tokens of the two views from ``Batch.extras[keys.
    VIEW_TOKENS]`` (a pair of ``[B, P, D]`` tensors, from the dataset or a transform). The
    direction ``u`` (buffer ``[D]``, checkpointed) is given as ``direction`` or fitted by
    :meth:`fit` on reference tokens (:func:`principal_direction`). The per-pair loss given to
    :meth:`reduce` is both directions' loss of the pair (the authors weight each direction's
    loss by the same ``w``)."""

    normalize = False
    resizable_buffers = ("direction",)

    def __init__(self, gamma: Annotated[float, Gt(0)] = 1.0,
                 distance: Annotated[str, one_of(("cosine", "dot"))] = "cosine",
                 direction: Tensor | None = None):
        super().__init__()
        self.gamma, self.distance = gamma, distance
        if direction is not None and (direction.dim() != 1 or not direction.is_floating_point()):
            raise ShapeError(f"{OWNER}: direction must be a floating vector [D], got "
                             f"{direction.dtype} {list(direction.shape)}")
        self.register_buffer("direction", torch.empty(0) if direction is None
                             else direction.detach().float().clone())

    def fit(self, reference_tokens: Tensor) -> GenViewQualityWeight:
        """``direction <- principal_direction(reference_tokens)``; returns ``self``."""
        self.direction = principal_direction(reference_tokens).to(self.direction.device)
        return self

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Batch]:
        """For the conformance kit: random tokens of two views (8 patches of width 5), fitted."""
        tokens = tuple(torch.randn(batch_size, 8, 5, generator=generator) for _ in range(2))
        if self.direction.numel() == 0:
            self.fit(torch.cat(tokens))
        per_sample = torch.rand(batch_size, generator=generator) + 0.5
        return per_sample.requires_grad_(), Batch(extras={keys.VIEW_TOKENS: tokens})

    def weights(self, per_sample: Tensor, batch: Batch) -> Tensor:
        check_rows(OWNER, per_sample, batch)
        tokens = batch.extras.get(keys.VIEW_TOKENS)
        if tokens is None:
            raise RequirementError(f"{OWNER} needs Batch.extras[{keys.VIEW_TOKENS!r}]: the frozen "
                                   "encoder's patch tokens of the two views, ([B, P, D], [B, P, D])")
        if not isinstance(tokens, (tuple, list)) or len(tokens) != 2:
            raise ShapeError(f"{OWNER}: Batch.extras[{keys.VIEW_TOKENS!r}] must be a pair of "
                             f"[B, P, D] tensors, got {type(tokens).__name__}")
        t1, t2 = tokens
        b = per_sample.shape[0]
        width = self.direction.numel()
        for i, t in enumerate((t1, t2)):
            if (not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point()
                    or t.shape[0] != b or t.shape[1] < 1 or (width and t.shape[2] != width)):
                what = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"{OWNER}: Batch.extras[{keys.VIEW_TOKENS!r}][{i}] must be floating "
                                 f"tokens [{b}, P, {width or 'D'}], got {what}")
        if width == 0:
            raise NotFittedError(f"{OWNER}: no direction; give direction=... or call fit(tokens)")
        q = pair_quality(t1.detach().float(), t2.detach().float(), self.direction, self.distance)
        return global_softmax(self.gamma * q).to(per_sample.dtype)


CARD = Card(
    name="genview_quality_weight", kind="reweighter",
    title="GenView: Enhancing View Quality with Pretrained Generative Model for Self-Supervised "
          "Learning",
    paper="arXiv:2403.12003",
    summary="Quality-driven contrastive loss: a frozen encoder's patch tokens give each view a "
            "soft foreground / background (projection on the first principal direction); pairs "
            "whose foregrounds agree more than their backgrounds weigh more.",
    formula="m_p = T_p . u, min-max normalised per image; fg = m / sum m, bg = (1 - m) / sum (1 - m); "
            "fg_i = sum_p fg_p T_p (bg_i likewise); q_i = cos(fg^1_i, fg^2_i) - cos(bg^1_i, bg^2_i); "
            "w_i = B exp(gamma q_i) / sum_j exp(gamma q_j) (detached), gamma = 1; loss = (1/B) "
            "sum_i w_i l_i",
    left_out="The diffusion-based adaptive view generation (noise level from the foreground "
             "ratio) and the CLIP ConvNeXt tokens: any frozen encoder's tokens can be given in "
             "Batch.extras. The authors pick the principal direction's sign by hand (foreground = "
             "high projection); fit() orients it so that the foreground is the smaller part of the "
             "tokens. The softmax runs over the global batch under DDP (the authors': per GPU).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GenViewQualityWeight, card=CARD)
