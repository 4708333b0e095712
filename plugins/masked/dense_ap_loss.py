"""CoTAP: distil patch correspondences between two views with an average-precision loss whose
relevance labels are continuous (a target branch's patch similarities) instead of InfoNCE.

Wen, Xu, Dai, Cong and Huang, "Semantic Concentration for Self-Supervised Dense Representations
Learning", IEEE TPAMI 2025 (arXiv:2509.09429).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.ssl import at_least_float32
from sdk.types import Batch, Loss, Views


def continuous_ap(scores: Tensor, targets: Tensor, temperature: float = 0.01) -> Tensor:
    """``[...]``: the smoothed average precision of each ranked list ``scores [..., N]`` under
    graded relevance ``targets [..., N]`` (in ``[0, 1]``):

    ``AP = sum_j y_j P_j / sum_j y_j``, ``P_j = (y_j + sum_{k != j} y_k s(k, j)) / (1 + sum_{k != j}
    s(k, j))``, ``s(k, j) = sigmoid((score_k - score_j) / temperature)``,

    the precision at ``j``'s rank with the positives counted by their relevance; for 0/1 targets
    it is Smooth-AP (Brown et al., 2020), and as ``temperature -> 0`` the exact (graded) AP. A list
    without relevance (``sum_j y_j = 0``) gives 0."""
    n = scores.shape[-1]
    diff = (scores[..., None, :] - scores[..., :, None]) / temperature  # [..., j, k]: s_k - s_j
    eye = torch.eye(n, dtype=torch.bool, device=scores.device)
    above = torch.where(eye, torch.ones_like(diff), torch.sigmoid(diff))  # self counts once
    rank = above.sum(-1)
    rank_pos = (above * targets[..., None, :]).sum(-1)
    return (targets * rank_pos / rank).sum(-1) / targets.sum(-1).clamp_min(1e-12)


def correspondence_ap_loss(student_u: Tensor, student_v: Tensor, target_u: Tensor,
                           target_v: Tensor, temperature: float = 0.01) -> Tensor:
    """``[B]``: ``1 - mean_i AP_i`` for each query patch ``i`` of view ``u`` ranking the patches
    ``j`` of view ``v`` of the same image by the student's cosine similarity, with relevance
    ``y_ij = max(0, cos(t_u_i, t_v_j))`` from the target branch's tokens (detached); queries
    without any relevant patch are left out of the mean. Tokens ``[B, L, D]``."""
    s = torch.einsum("bid,bjd->bij", F.normalize(at_least_float32(student_u), dim=-1),
                     F.normalize(at_least_float32(student_v), dim=-1))
    tu, tv = (F.normalize(at_least_float32(t.detach()), dim=-1).to(s.dtype) for t in (target_u, target_v))
    y = torch.einsum("bid,bjd->bij", tu, tv).clamp_min(0)
    valid = (y.sum(-1) > 0).to(s.dtype)
    ap = continuous_ap(s, y, temperature)
    return ((1 - ap) * valid).sum(-1) / valid.sum(-1).clamp_min(1)


class DenseAPLoss(Objective):
    """Exactly two views' patch tokens from a token encoder (more views are refused),
    ``Views.extras[keys.FEATURES]`` (``[B, 1 + L, D]`` with the class token first, as ``vit`` gives
    them, or ``[B, L, D]`` with ``class_token=False``). The target branch's tokens of the same views are
    ``Batch.extras[keys.VIEW_TOKENS]`` (a pair of ``[B, L, D_t]``, e.g. a momentum or frozen
    teacher's); without them the student's own tokens, detached, are the targets. Loss: the mean of
    :func:`correspondence_ap_loss` from view 0 to view 1 and from view 1 to view 0, per sample
    (each image's patches are ranked among the patches of its other view). The class tokens
    enter only as ``0 * sum``, so a non-finite one still makes the loss non-finite."""

    requires = {"views": 2, "extras": (keys.FEATURES,)}
    batch_coupled = False

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.01, class_token: bool = True):
        super().__init__()
        self.temperature, self.class_token = temperature, class_token

    def _tokens(self, owner: str, views: Views) -> tuple[Tensor, Tensor, Tensor]:
        feats = views.extras[keys.FEATURES]
        if not isinstance(feats, (tuple, list)) or len(feats) != 2:
            got = len(feats) if isinstance(feats, (tuple, list)) else type(feats).__name__
            raise ShapeError(f"{owner}: Views.extras['features'] must hold the tokens of exactly two "
                             f"views (the pair whose patches correspond), got {got}")
        out = []
        skip = int(self.class_token)
        for i, t in enumerate(feats):
            if (not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point()
                    or t.shape[1] < 1 + skip):
                shape = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                token = "1 + L" if skip else "L"
                raise ShapeError(f"{owner}: Views.extras['features'][{i}] must be floating tokens [B, "
                                 f"{token}, D] (class_token={self.class_token}), got {shape}")
            out.append(t[:, skip:])
        if out[0].shape[0] != out[1].shape[0] or out[0].shape[2] != out[1].shape[2]:
            raise ShapeError(f"{owner}: the two views' tokens must share batch size and width, got "
                             f"{list(out[0].shape)} and {list(out[1].shape)}")
        # the class tokens take no part, but a non-finite one must not be hidden: 0 * their sum
        left_out = sum(at_least_float32(t[:, :skip]).sum((1, 2)) for t in feats)
        return out[0], out[1], 0 * left_out

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'dense_ap_loss'"
        u, v, unused = self._tokens(owner, views)
        targets = batch.extras.get(keys.VIEW_TOKENS)
        if targets is None:
            tu, tv = u, v  # correspondence_ap_loss detaches the targets
        else:
            if not isinstance(targets, (tuple, list)) or len(targets) != 2:
                raise ShapeError(f"{owner}: Batch.extras[{keys.VIEW_TOKENS!r}] must be the target "
                                 f"branch's tokens of the two views, a pair of [B, L, D_t]")
            tu, tv = targets
            for i, (t, z) in enumerate(((tu, u), (tv, v))):
                if (not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point()
                        or t.shape[:2] != z.shape[:2]):
                    shape = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                    raise ShapeError(f"{owner}: Batch.extras[{keys.VIEW_TOKENS!r}][{i}] must be floating "
                                     f"[{z.shape[0]}, {z.shape[1]}, D_t] (the view's patches), got {shape}")
        per_sample = 0.5 * (correspondence_ap_loss(u, v, tu, tv, self.temperature)
                            + correspondence_ap_loss(v, u, tv, tu, self.temperature)) + unused
        return Loss(value=per_sample.mean(), per_sample=per_sample)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Two views of 1 + 6 tokens of width 8 and the target branch's 6 patch tokens of each."""
        skip = int(self.class_token)
        z = tuple(torch.randn(batch_size, skip + 6, 8, generator=generator).requires_grad_()
                  for _ in range(2))
        t = tuple(torch.randn(batch_size, 6, 8, generator=generator) for _ in range(2))
        views = Views(embeddings=tuple(x[:, 0].detach() for x in z), extras={keys.FEATURES: z})
        return views, Batch(extras={keys.VIEW_TOKENS: t})


CARD = Card(
    name="dense_ap_loss", kind="objective",
    title="Semantic Concentration for Self-Supervised Dense Representations Learning (CoTAP)",
    paper="arXiv:2509.09429",
    summary="Patch-correspondence distillation with a ranking loss: each patch of one view ranks "
            "the patches of the other view by the student's similarity, scored by an average "
            "precision whose relevance labels are the target branch's (continuous) similarities.",
    formula="s_ij = cos(z_u_i, z_v_j), y_ij = max(0, cos(t_u_i, t_v_j)) (detached); sig_jk = "
            "sigmoid((s_ik - s_ij) / tau); P_ij = (y_ij + sum_{k != j} y_ik sig_jk) / (1 + sum_{k "
            "!= j} sig_jk); AP_i = sum_j y_ij P_ij / sum_j y_ij; L = 1 - mean_i AP_i, averaged "
            "over both directions u -> v and v -> u; tau = 0.01",
    left_out="The paper's equations could not be read here (the authors' code and the paper's "
             "text were not reachable); the loss is the continuous-target extension of Smooth-AP "
             "that the abstract describes, with these choices of ours: relevance max(0, cosine) "
             "of the target tokens, tau = 0.01 (Smooth-AP's), each image's patches ranked among "
             "its other view's patches only, both directions averaged. The target branch is "
             "whatever gives Batch.extras['view_tokens'] (a momentum teacher's tokens in the "
             "paper); without it, the student's detached tokens. The object-aware filter "
             "(learnable object prototypes by cross-attention), the self-distillation framework's "
             "other terms, scene-centric data (COCO) and the ViT backbones are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DenseAPLoss, card=CARD)
