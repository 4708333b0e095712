"""FedSA: semantic anchors as class prototypes, a margin-enhanced contrast of the features to them.

Zhou, Qu, You, Zhou, Tang, Zheng, Cai and Wu, "FedSA: A Unified Representation Learning via
Semantic Anchors for Prototype-based Federated Learning", AAAI 2025 (arXiv:2501.05496). One
client's objective: cross-entropy plus the anchor-based regularisation with margin-enhanced
contrastive learning (RMCL) and the anchor-based classifier calibration (CC: the model's
classifier is also trained to label each anchor with its class); the anchors follow an EMA toward
the class prototypes.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn
from torch.nn import functional as F

from sdk import keys
from sdk.card import Card
from sdk.classification import targets
from sdk.context import FromData
from sdk.distributed import Gather, gather_no_grad, resolve_gather
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.state import ResizableBuffers
from sdk.types import Batch, Loss, Views

_NAME = "fedsa_semantic_anchors"


def rmcl_loss(features: Tensor, anchors: Tensor, labels: Tensor, margin: float, temperature: float) -> Tensor:
    """Per sample ``-log e^{(cos(z, a_y) - m)/tau} / (e^{(cos(z, a_y) - m)/tau} +
    sum_{c != y} e^{cos(z, a_c)/tau})``: a cross-entropy over the cosines to the anchors with the
    target's cosine lowered by the margin ``m``."""
    cos = F.normalize(features, dim=1) @ F.normalize(anchors, dim=1).T  # [B, C]
    cos = cos - margin * F.one_hot(labels, anchors.shape[0]).to(cos.dtype)
    return F.cross_entropy(cos / temperature, labels, reduction="none")


def anchor_ema(anchors: Tensor, features: Tensor, labels: Tensor, rho: float) -> Tensor:
    """``a_c <- normalize(rho a_c + (1 - rho) p_c)``, ``p_c`` the mean of the batch's normalised
    class-``c`` features; a class absent from the batch keeps its anchor."""
    onehot = F.one_hot(labels, anchors.shape[0]).to(anchors.dtype)  # [B, C]
    n = onehot.sum(0)
    prototypes = onehot.T @ F.normalize(features.to(anchors.dtype), dim=1) / n.clamp_min(1)[:, None]
    moved = F.normalize(rho * anchors + (1 - rho) * prototypes, dim=1)
    return torch.where(n[:, None] > 0, moved, anchors)


def classifier_calibration_loss(head: nn.Module, anchors: Tensor) -> Tensor:
    """``1/C sum_c CE(g(a_c), c)``: the classifier ``g`` (features ``[C, D]`` -> scores ``[C, C]``)
    applied to the (detached) anchors, each labelled with its own class."""
    scores = head(anchors.detach())
    if scores.dim() != 2 or scores.shape != (anchors.shape[0], anchors.shape[0]):
        raise ShapeError(f"objective {_NAME!r}: the encoder's head maps the {anchors.shape[0]} "
                         f"anchors to {list(scores.shape)}, not to {anchors.shape[0]} class scores each")
    z = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    return F.cross_entropy(z, torch.arange(anchors.shape[0], device=z.device))


class FedSASemanticAnchors(ResizableBuffers, Objective):
    """``L = CE(logits, y) + lambda_1 RMCL(f, anchors, y)`` on the features ``f``
    (``Views.extras[keys.FEATURES][0]``) and logits of a labelled batch. The ``C`` anchors are
    unit vectors, orthonormal at the start (a seeded random orthogonal basis, when ``C <= D``),
    kept as a checkpointed buffer; after each call they take one :func:`anchor_ema` step toward
    the batch's class prototypes (no gradient). Anchors and prototypes are over the global batch
    (``gather``: "auto", under DDP).

    The classifier calibration ``lambda_2 L_CC`` (:func:`classifier_calibration_loss`) needs the
    classifier itself: in a Trainer run it is the encoder's ``head`` (the module that maps the
    published features to the logits), and the term is added to the step's loss after the loss
    is computed (``after_loss``), on the anchors this step left behind. Called directly, the
    objective returns ``CE + lambda_1 RMCL`` and :meth:`calibration` gives the term for a
    given head."""

    requires = {"logits": True, "targets": True, "extras": (keys.FEATURES,)}
    batch_coupled = True  # the anchors a batch leaves behind depend on all its rows
    resizable_buffers = ("anchors",)

    def __init__(self, margin: Annotated[float, Ge(0)] = 0.1, temperature: Annotated[float, Gt(0)] = 0.1,
                 lambda_1: Annotated[float, Ge(0)] = 1.0,
                 lambda_2: Annotated[float, Ge(0)] = 1.0, rho: Annotated[float, Interval(ge=0, le=1)] = 0.9,
                 num_classes: Annotated[int | None, FromData("num_classes"), Gt(1)] = None,
                 seed: Annotated[int, Ge(0)] = 0, gather: Gather = "auto"):
        super().__init__()
        self.margin, self.temperature, self.lambda_1, self.rho = margin, temperature, lambda_1, rho
        self.lambda_2 = lambda_2
        self.num_classes, self.seed, self.gather = num_classes, seed, gather
        self.register_buffer("anchors", torch.zeros(0, 0))

    def initial_anchors(self, num_classes: int, dim: int) -> Tensor:
        """Unit anchors ``[C, D]`` from ``seed``: orthonormal rows when ``C <= D``."""
        g = torch.Generator().manual_seed(self.seed)
        a = torch.randn(max(num_classes, dim), dim, generator=g, dtype=torch.float64)
        if num_classes <= dim:
            a = torch.linalg.qr(a)[0][:num_classes]
        return F.normalize(a[:num_classes], dim=1).float()

    def calibration(self, head: nn.Module) -> Tensor:
        """``lambda_2 L_CC`` of ``head`` on the current anchors."""
        if self.anchors.numel() == 0:
            raise RequirementError(f"objective {self.name!r}: the anchors are made on the first batch; "
                                   "call the objective before the calibration")
        return self.lambda_2 * classifier_calibration_loss(head, self.anchors)

    def on_fit_start(self, state: Any) -> None:
        if self.lambda_2 > 0 and getattr(state.model, "head", None) is None:
            raise RequirementError(f"objective {self.name!r}: the classifier calibration "
                                   "(lambda_2 > 0) trains the encoder's head on the anchors, but "
                                   f"{type(state.model).__name__} has no head (use an encoder with "
                                   "a head, e.g. projection_head, or lambda_2=0)")

    def after_loss(self, state: Any) -> None:
        if self.lambda_2 == 0 or self.anchors.numel() == 0:
            return
        cc = self.calibration(state.model.head)
        loss = state.loss
        state.loss = Loss(value=loss.value + cc, per_sample=loss.per_sample,
                          logs={**loss.logs, "classifier_calibration": cc.detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: 8-wide features and logits of 4 classes."""
        f = torch.randn(batch_size, 8, generator=generator).requires_grad_()
        logits = torch.randn(batch_size, 4, generator=generator).requires_grad_()
        return (Views(logits=logits, extras={keys.FEATURES: (f,)}),
                Batch(targets=torch.arange(batch_size) % 4))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        extras = views.extras if keys.FEATURES in views.extras else batch.extras
        f = extras[keys.FEATURES]
        f = f[0] if isinstance(f, (tuple, list)) else f
        logits = views.logits
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != logits.shape[0]:
            shape = list(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ShapeError(f"{owner}: extras[{keys.FEATURES!r}] must be features [B, D] of the "
                             f"{logits.shape[0]} rows of Views.logits, got {shape}")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ShapeError(f"{owner}: Views.logits has {logits.shape[1]} classes, num_classes is "
                             f"{self.num_classes}")
        y = targets(owner, logits, batch.targets, soft=False).ids
        c, d = logits.shape[1], f.shape[1]
        if self.anchors.numel() == 0:
            self.anchors = self.initial_anchors(c, d).to(f.device)
        elif self.anchors.shape != (c, d):
            raise ShapeError(f"{owner}: the anchors are {list(self.anchors.shape)} but the batch has "
                             f"{c} classes and {d}-wide features")
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        ff = f if f.dtype in (torch.float32, torch.float64) else f.float()
        ce = F.cross_entropy(z, y, reduction="none")
        anchors = self.anchors.to(ff.dtype, copy=True)
        rmcl = rmcl_loss(ff, anchors, y, self.margin, self.temperature)
        per_sample = ce + self.lambda_1 * rmcl
        with torch.no_grad():
            if resolve_gather(self.gather):
                ff, y = gather_no_grad(ff.detach()), gather_no_grad(y)
            self.anchors.copy_(anchor_ema(anchors, ff.detach(), y, self.rho).to(self.anchors.dtype))
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"cross_entropy": ce.mean().detach(), "rmcl": rmcl.mean().detach()})


CARD = Card(
    name=_NAME, kind="objective",
    title="FedSA: A Unified Representation Learning via Semantic Anchors for Prototype-based "
          "Federated Learning",
    paper="arXiv:2501.05496",
    summary="One client's objective: cross-entropy plus a margin-enhanced contrast of each "
            "sample's features to C unit semantic anchors (the target's cosine lowered by a "
            "margin) and a calibration of the classifier on the anchors themselves, the anchors "
            "following an EMA (rho = 0.9) toward the class prototypes, so that representations "
            "and decision boundaries gather around shared, well-separated class anchors.",
    formula="L = CE(z, y) + lambda_1 RMCL + lambda_2 L_CC, L_CC = 1/C sum_c CE(g(a_c), c) (g the "
            "classifier head), RMCL = -log e^{(cos(f, a_y) - m)/tau} / (e^{(cos(f, a_y) - "
            "m)/tau} + sum_{c != y} e^{cos(f, a_c)/tau}); a_c <- normalize(rho a_c + (1 - rho) "
            "mean_{i: y_i = c} f_i / |f_i|)",
    left_out="The paper's full text could not be consulted here: the margin's form (an additive "
             "cosine margin on the target inside the exponent), m = 0.1, tau = 0.1 and lambda_1 = 1 "
             "and the form of L_CC (the classifier's cross-entropy on the anchors, lambda_2 = 1) "
             "are the seed catalogue's reconstruction, not verified values; the abstract and "
             "the framework figure's caption only say that the anchors calibrate the "
             "classifier. L_CC trains the encoder's head (in a Trainer run) and is added after "
             "the loss, so it is not in per_sample. The anchors start as a "
             "seeded orthonormal basis instead of the paper's learnable embedding and projector, "
             "and their EMA runs once per batch on the batch's prototypes instead of once per "
             "federated round on the server's aggregated prototypes. The federated loop (clients, server "
             "aggregation, heterogeneous splits) is not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(FedSASemanticAnchors, card=CARD)
