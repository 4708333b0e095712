"""SECLA: symmetry-enhanced contrastive loss for weakly supervised face-name alignment.

Qu, Tuytelaars & Moens, "Weakly Supervised Face Naming with Symmetry-Enhanced Contrastive Loss",
WACV 2023, arXiv:2210.08957 (reference code github.com/tingyu215/SECLA).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

FACES, NAMES = "faces", "names"


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def bag_scores(names: Tensor, faces: Tensor, name_mask: Tensor, face_mask: Tensor,
               *, cosine: bool = False) -> tuple[Tensor, Tensor]:
    """Bag-to-bag scores ``(S_nf, S_fn)``, each [B, B].

    ``S_nf[a, b]`` is the mean over the names of bag ``a`` of the best match among the faces of
    bag ``b``; ``S_fn[a, b]`` the mean over the faces of ``a`` of the best name of ``b``.
    ``names`` [B, N, D], ``faces`` [B, F, D]; masks [B, N] / [B, F] mark real (unpadded) entries.
    Similarities are dot products (cosines with ``cosine``); one [B, B, N, F] tensor, no [B, B, D].
    """
    if cosine:
        names, faces = F.normalize(names, dim=-1), F.normalize(faces, dim=-1)
    sim = torch.einsum("and,bfd->abnf", names.float(), faces.float())  # names of a . faces of b
    neg = _neg(sim.dtype)
    best_face = sim.masked_fill(~face_mask[None, :, None, :], neg).amax(dim=3)  # [a, b, n]
    best_name = sim.masked_fill(~name_mask[:, None, :, None], neg).amax(dim=2)  # [a, b, f]
    n_names = name_mask.sum(1).clamp_min(1).to(sim.dtype)
    n_faces = face_mask.sum(1).clamp_min(1).to(sim.dtype)
    s_nf = (best_face * name_mask[:, None, :]).sum(-1) / n_names[:, None]
    # best_name[a, b, f]: faces f of bag b against names of a -> S_fn[b, a]
    s_fn = ((best_name * face_mask[None, :, :]).sum(-1) / n_faces[None, :]).T
    return s_nf, s_fn


def _hinge(names: Tensor, faces: Tensor, name_mask: Tensor, face_mask: Tensor, margin: float) -> Tensor:
    """Max-violation ranking on ``C = S_nf + S_fn`` of cosines (VSE++ style, both directions)."""
    s_nf, s_fn = bag_scores(names, faces, name_mask, face_mask, cosine=True)
    c = s_nf + s_fn
    diag = c.diagonal()
    off = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    cost_col = ((margin + c - diag[None, :]).clamp_min(0) * off).amax(dim=0)
    cost_row = ((margin + c - diag[:, None]).clamp_min(0) * off).amax(dim=1)
    return cost_col.sum() + cost_row.sum()


def symmetry_enhanced_contrastive_loss(faces: Tensor, names: Tensor, face_mask: Tensor | None = None,
                                       name_mask: Tensor | None = None, *, alpha: float = 0.5,
                                       hinge_weight: float = 0.0, margin: float = 0.2
                                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(S_nf, diag) + CE(S_fn, diag) + alpha * MSE(S_nf, S_fn^T) [+ hinge_weight * hinge]``.

    Returns the scalar loss and its parts (``names_to_faces``, ``faces_to_names``,
    ``agreement``, ``hinge``) per bag where meaningful.
    """
    b = faces.shape[0]
    face_mask = torch.ones(faces.shape[:2], dtype=torch.bool, device=faces.device) if face_mask is None \
        else face_mask.bool()
    name_mask = torch.ones(names.shape[:2], dtype=torch.bool, device=names.device) if name_mask is None \
        else name_mask.bool()
    s_nf, s_fn = bag_scores(names, faces, name_mask, face_mask)
    eye = torch.eye(b, dtype=torch.bool, device=faces.device)
    nf = contrastive.info_nce(s_nf, eye, ~eye)[0]  # CE(S_nf, diag): InfoNCE at temperature 1
    fn = contrastive.info_nce(s_fn, eye, ~eye)[0]
    agreement = (s_nf - s_fn.T).pow(2).mean()
    value = nf.mean() + fn.mean() + alpha * agreement
    hinge = _hinge(names, faces, name_mask, face_mask, margin) if hinge_weight else value.new_zeros(())
    value = value + hinge_weight * hinge
    return value, {"names_to_faces": nf, "faces_to_names": fn, "agreement": agreement, "hinge": hinge}


class SymmetryEnhancedContrastive(Objective):
    """SECLA: with bag scores ``S_nf``/``S_fn`` (:func:`bag_scores`) of a batch of B
    image-caption pairs (face bags and name bags)::

        L = CE(S_nf, diag) + CE(S_fn, diag) + alpha * mean_ab (S_nf[a,b] - S_fn[b,a])^2
            [+ hinge_weight * max-violation hinge with ``margin`` on cosine scores]

    Bags come from ``Views.extras["faces"]`` [B, F, D] and ``["names"]`` [B, N, D] with optional
    ``"faces_mask"``/``"names_mask"`` [B, F]/[B, N] (in ``Views`` or ``Batch`` extras) marking
    real entries; without them the two views are bags of one face and one name, and the loss
    is a symmetric InfoNCE at temperature 1 whose agreement term vanishes.
    """

    requires: dict = {}

    def __init__(self, alpha: Annotated[float, Ge(0)] = 0.5, hinge_weight: Annotated[float, Ge(0)] = 0.0,
                 margin: Annotated[float, Ge(0)] = 0.2):
        super().__init__()
        self.alpha, self.hinge_weight, self.margin = alpha, hinge_weight, margin

    @staticmethod
    def _mask(views: Views, batch: Batch, key: str, shape: torch.Size) -> Tensor | None:
        mask = views.extras.get(key, batch.extras.get(key))
        if mask is not None and tuple(mask.shape) != tuple(shape):
            raise ShapeError(f"extras[{key!r}]: expected shape {list(shape)}, got {list(mask.shape)}")
        return mask

    def forward(self, views: Views, batch: Batch) -> Loss:
        if FACES in views.extras or NAMES in views.extras:
            faces, names = views.extras.get(FACES), views.extras.get(NAMES)
            if faces is None or names is None:
                raise RequirementError("objective 'symmetry_enhanced_contrastive' needs both "
                                       "Views.extras['faces'] and Views.extras['names']")
            if faces.dim() != 3 or names.dim() != 3 or faces.shape[0] != names.shape[0] \
                    or faces.shape[2] != names.shape[2]:
                raise ShapeError(f"Views.extras['faces'] / ['names']: expected [B, F, D] and [B, N, D], "
                                 f"got {list(faces.shape)} and {list(names.shape)}")
            face_mask = self._mask(views, batch, "faces_mask", faces.shape[:2])
            name_mask = self._mask(views, batch, "names_mask", names.shape[:2])
        elif views.n_views >= 2:
            faces, names = views.embeddings[0][:, None], views.embeddings[1][:, None]
            face_mask = name_mask = None
        else:
            raise RequirementError("objective 'symmetry_enhanced_contrastive' needs 2 views or "
                                   "Views.extras['faces'] and ['names'] bags")
        value, parts = symmetry_enhanced_contrastive_loss(
            faces, names, face_mask, name_mask, alpha=self.alpha, hinge_weight=self.hinge_weight,
            margin=self.margin)
        per_sample = parts["names_to_faces"] + parts["faces_to_names"]
        return Loss(value=value, per_sample=per_sample,
                    logs={"names_to_faces": parts["names_to_faces"].mean().detach(),
                          "faces_to_names": parts["faces_to_names"].mean().detach(),
                          "agreement": parts["agreement"].detach(), "hinge": parts["hinge"].detach()})


CARD = Card(
    name="symmetry_enhanced_contrastive", kind="objective",
    title="Weakly Supervised Face Naming with Symmetry-Enhanced Contrastive Loss",
    paper="arXiv:2210.08957",
    summary="SECLA: bag-level contrastive matching of face bags and name bags in both directions "
            "(names->faces and faces->names), plus an agreement term that makes the two "
            "directions' scores symmetric; optional max-violation cosine hinge.",
    formula="S_nf[a,b] = mean_{n in a} max_{f in b} <n,f>; S_fn[a,b] = mean_{f in a} max_{n in b} <f,n>; "
            "L = CE(S_nf, diag) + CE(S_fn, diag) + alpha * mean (S_nf - S_fn^T)^2 "
            "+ hinge_weight * sum max-violation relu(margin + C_ab - C_bb), C = S_nf + S_fn on cosines; "
            "alpha=0.5, margin=0.2",
    left_out="SECLA-B's easy-to-hard curriculum and bootstrapped known pairs with the "
             "anti-forgetting term; FaceNet/BERT encoders and caption name extraction; the "
             "'conditional maximum' score variant. Padding is masked (the reference pads with zero "
             "vectors that join the max and the mean's count); the hinge excludes the diagonal "
             "(the reference zero-fills it).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SymmetryEnhancedContrastive, card=CARD)
