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
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, rank, resolve_gather
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

FACES, NAMES = "faces", "names"
AGREEMENTS = ("diagonal", "full")


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


def _hinge(s_nf: Tensor, s_fn: Tensor, margin: float) -> Tensor:
    """Max-violation ranking on ``C = S_nf + S_fn`` (VSE++ style, both directions)."""
    c = s_nf + s_fn
    diag = c.diagonal()
    off = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    cost_col = ((margin + c - diag[None, :]).clamp_min(0) * off).amax(dim=0)
    cost_row = ((margin + c - diag[:, None]).clamp_min(0) * off).amax(dim=1)
    return cost_col.sum() + cost_row.sum()


def _check_agreement(agreement: str) -> None:
    if agreement not in AGREEMENTS:
        raise ConfigError(f"symmetry_enhanced_contrastive: agreement must be one of {AGREEMENTS}, "
                          f"got {agreement!r}", param="agreement")


def symmetry_enhanced_contrastive_loss(faces: Tensor, names: Tensor, face_mask: Tensor | None = None,
                                       name_mask: Tensor | None = None, *, alpha: float = 0.15,
                                       agreement: str = "diagonal", hinge_weight: float = 0.0,
                                       margin: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(S_nf, diag) + CE(S_fn, diag) + alpha * agreement [+ hinge_weight * hinge]``.

    ``agreement="diagonal"``: ``mean_a (S_nf[a,a] - S_fn[a,a])^2`` (the authors' scripts);
    ``"full"``: ``mean_ab (S_nf[a,b] - S_fn[b,a])^2``. With ``hinge_weight > 0`` (the reference's
    agree-hinge mode) faces and names are L2-normalised before all terms. Returns the scalar
    loss and its parts (``names_to_faces``, ``faces_to_names`` per bag, ``agreement``, ``hinge``).
    """
    _check_agreement(agreement)
    b = faces.shape[0]
    face_mask = torch.ones(faces.shape[:2], dtype=torch.bool, device=faces.device) if face_mask is None \
        else face_mask.bool()
    name_mask = torch.ones(names.shape[:2], dtype=torch.bool, device=names.device) if name_mask is None \
        else name_mask.bool()
    s_nf, s_fn = bag_scores(names, faces, name_mask, face_mask, cosine=hinge_weight > 0)
    eye = torch.eye(b, dtype=torch.bool, device=faces.device)
    nf = contrastive.info_nce(s_nf, eye, ~eye)[0]  # CE(S_nf, diag): InfoNCE at temperature 1
    fn = contrastive.info_nce(s_fn, eye, ~eye)[0]
    gap = s_nf - s_fn.T
    agree = (gap.diagonal() if agreement == "diagonal" else gap).pow(2).mean()
    value = nf.mean() + fn.mean() + alpha * agree
    hinge = _hinge(s_nf, s_fn, margin) if hinge_weight else value.new_zeros(())
    value = value + hinge_weight * hinge
    return value, {"names_to_faces": nf, "faces_to_names": fn, "agreement": agree, "hinge": hinge}


class SymmetryEnhancedContrastive(Objective):
    """SECLA: with bag scores ``S_nf``/``S_fn`` (:func:`bag_scores`) of a batch of B
    image-caption pairs (face bags and name bags)::

        L = CE(S_nf, diag) + CE(S_fn, diag) + alpha * mean_a (S_nf[a,a] - S_fn[a,a])^2
            [+ hinge_weight * max-violation hinge with ``margin``]

    ``alpha = 0.15`` and the diagonal agreement are the authors' training scripts' settings;
    ``agreement="full"`` compares every pair, ``mean_ab (S_nf[a,b] - S_fn[b,a])^2``. With
    ``hinge_weight > 0`` (the reference's agree-hinge mode) every term is computed on cosines.

    Bags come from ``Views.extras["faces"]`` [B, F, D] and ``["names"]`` [B, N, D] with optional
    ``"faces_mask"``/``"names_mask"`` [B, F]/[B, N] (in ``Views`` or ``Batch`` extras) marking
    real entries; without them the two views are bags of one face and one name, and the loss
    is a symmetric InfoNCE at temperature 1 whose agreement term vanishes. ``gather`` ("auto":
    under DDP) gathers every rank's bags (of one shape on every rank) and each rank computes the
    loss of the global batch, as one process would; ``per_sample`` keeps this rank's bags.
    """

    requires: dict = {}
    batch_coupled = True

    def __init__(self, alpha: Annotated[float, Ge(0)] = 0.15,
                 agreement: Annotated[str, one_of(AGREEMENTS)] = "diagonal",
                 hinge_weight: Annotated[float, Ge(0)] = 0.0, margin: Annotated[float, Ge(0)] = 0.2,
                 gather: Gather = "auto"):
        super().__init__()
        self.alpha, self.agreement, self.hinge_weight, self.margin = alpha, agreement, hinge_weight, margin
        self.gather = gather

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Bags of 1 to 3 faces and 1 or 2 names (the rest padding); the view is unused."""
        faces = torch.randn(batch_size, 3, 16, generator=generator).requires_grad_()
        names = torch.randn(batch_size, 2, 16, generator=generator).requires_grad_()
        sizes = torch.arange(batch_size)
        extras = {FACES: faces, NAMES: names,
                  "faces_mask": torch.arange(3)[None, :] <= (sizes % 3)[:, None],
                  "names_mask": torch.arange(2)[None, :] <= (sizes % 2)[:, None]}
        return Views(embeddings=(faces.detach().mean(1),), extras=extras), Batch()

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
        b = faces.shape[0]
        gathered = resolve_gather(self.gather)
        if gathered:
            faces, names = gather_with_grad(faces), gather_with_grad(names)
            face_mask, name_mask = (None if m is None else gather_no_grad(m.to(torch.uint8)).bool()
                                    for m in (face_mask, name_mask))
        value, parts = symmetry_enhanced_contrastive_loss(
            faces, names, face_mask, name_mask, alpha=self.alpha, agreement=self.agreement,
            hinge_weight=self.hinge_weight, margin=self.margin)
        per_sample = parts["names_to_faces"] + parts["faces_to_names"]
        if gathered:
            per_sample = per_sample[rank() * b:(rank() + 1) * b]
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
            "L = CE(S_nf, diag) + CE(S_fn, diag) + alpha * mean_a (S_nf[a,a] - S_fn[a,a])^2 "
            "(agreement='full': mean_ab (S_nf[a,b] - S_fn[b,a])^2) "
            "+ hinge_weight * sum max-violation relu(margin + C_ab - C_bb), C = S_nf + S_fn; "
            "with hinge_weight > 0 all terms on cosines (L2-normalised faces and names); "
            "alpha=0.15, margin=0.2 (the authors' scripts)",
    left_out="SECLA-B's easy-to-hard curriculum and bootstrapped known pairs with the "
             "anti-forgetting term; FaceNet/BERT encoders and caption name extraction; the "
             "'conditional maximum' score variant. Padding is masked (the reference pads with zero "
             "vectors that join the max and the mean's count); the hinge excludes the diagonal "
             "(the reference zero-fills it). The reference divides the agreement's faces->names scores by "
             "the padded name count; here each direction uses its own real count.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SymmetryEnhancedContrastive, card=CARD)
