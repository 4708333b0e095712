"""REPA: align a projection of the model's representation with a frozen pretrained encoder's.

Yu, Kwak, Jang, Jeong, Huang, Shin & Xie, "Representation Alignment for Generation: Training
Diffusion Transformers Is Easier Than You Think", arXiv:2410.06940 (reference code
github.com/sihyun-yu/REPA).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.keys import FEATURES, TARGET_FEATURES, TEACHER
from sdk.types import Batch, Loss, Views


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Per row ``-cos(h_phi(h)_n, y*_n)`` [N]; the target is fixed (no gradient)."""
    dtype = torch.promote_types(projected.dtype, torch.float32)
    return -F.cosine_similarity(projected.to(dtype), target.detach().to(dtype), dim=-1)


class Projector(nn.Module):
    """REPA's ``h_phi``: Linear(F, hidden), SiLU, Linear(hidden, hidden), SiLU, Linear(hidden, Dz);
    the input width ``F`` and output width ``Dz`` are taken on first use. Linear layers are
    Xavier-uniform with zero bias, as the reference model initialises them."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w1, self.b1 = nn.UninitializedParameter(), nn.UninitializedParameter()
        self.w2, self.b2 = nn.UninitializedParameter(), nn.UninitializedParameter()
        self.w3, self.b3 = nn.UninitializedParameter(), nn.UninitializedParameter()

    def _materialise(self, width: int, out: int, device: torch.device) -> None:
        if not isinstance(self.w1, nn.UninitializedParameter):
            return
        shapes = ((self.hidden, width), (self.hidden, self.hidden), (out, self.hidden))
        for i, shape in enumerate(shapes, start=1):
            weight, bias = getattr(self, f"w{i}"), getattr(self, f"b{i}")
            weight.materialize(shape, device=device)
            bias.materialize((shape[0],), device=device)
            with torch.no_grad():
                nn.init.xavier_uniform_(weight)
                bias.zero_()

    def forward(self, h: Tensor, out: int) -> Tensor:
        self._materialise(h.shape[-1], out, h.device)
        dtype = torch.promote_types(h.dtype, torch.float32)
        x = h.to(dtype)
        for i in (1, 2, 3):
            x = F.linear(x, getattr(self, f"w{i}").to(dtype), getattr(self, f"b{i}").to(dtype))
            if i < 3:
                x = F.silu(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        w1, w3 = state_dict.get(prefix + "w1"), state_dict.get(prefix + "w3")
        if isinstance(self.w1, nn.UninitializedParameter) and w1 is not None and w3 is not None:
            self._materialise(w1.shape[1], w3.shape[0], w1.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RepresentationAlignment(Objective):
    """``weight * mean_n -cos(h_phi(h_n), y*_n)`` with a trainable projector ``h_phi``
    (:class:`Projector`). ``h`` is each view's backbone features (``Views.extras["features"]``)
    when the encoder publishes them, else its embeddings; the frozen pretrained encoder's
    features ``y*`` are the teacher's output on the view (``Views.extras["teacher"]``) or, when
    no teacher runs, the precomputed ``Batch.extras["target_features"]`` [B, Dz]. Views are
    averaged. Per sample: the loss of a row depends on that row only."""

    requires = {"views": 1}
    consumes = frozenset({Input.FEATURES})
    batch_coupled = False

    def __init__(self, weight: Annotated[float, Ge(0)] = 0.5,
                 projector_dim: Annotated[int, Ge(1)] = 2048):
        super().__init__()
        self.weight = weight
        self.projector = Projector(projector_dim)

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Embeddings [B, 16] and frozen targets [B, 12] (no gradient) in ``Batch.extras``."""
        h = torch.randn(batch_size, 16, generator=generator).requires_grad_()
        target = torch.randn(batch_size, 12, generator=generator)
        return Views(embeddings=(h,)), Batch(extras={TARGET_FEATURES: target})

    def _targets(self, views: Views, batch: Batch) -> tuple[Tensor, ...]:
        owner = f"objective {self.name!r}"
        teacher = views.extras.get(TEACHER)
        if teacher is not None:
            targets, field = tuple(teacher), "Views.extras['teacher']"
        elif TARGET_FEATURES in batch.extras:
            targets = (batch.extras[TARGET_FEATURES],) * views.n_views
            field = "Batch.extras['target_features']"
        else:
            raise RequirementError(f"{owner} needs the frozen encoder's features: a teacher's "
                                   "Views.extras['teacher'] or Batch.extras['target_features'] "
                                   "[B, Dz]")
        b = views.batch_size
        if len(targets) != views.n_views:
            raise ShapeError(f"{owner}: {field} holds {len(targets)} entries for {views.n_views} views")
        for t in targets:
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] != b or not t.is_floating_point():
                shape = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ShapeError(f"{owner}: {field} must be floating [{b}, Dz], got {shape}")
        widths = {t.shape[1] for t in targets}
        if len(widths) > 1:
            raise ShapeError(f"{owner}: {field} entries differ in width {sorted(widths)}")
        return targets

    def forward(self, views: Views, batch: Batch) -> Loss:
        targets = self._targets(views, batch)
        hidden = views.extras.get(FEATURES, views.embeddings)
        if len(hidden) != views.n_views:
            raise ShapeError(f"objective {self.name!r}: Views.extras['features'] holds {len(hidden)} "
                             f"entries for {views.n_views} views")
        per_view = [alignment_loss(self.projector(h, y.shape[1]), y) for h, y in zip(hidden, targets)]
        per_sample = self.weight * torch.stack(per_view).mean(0)
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"cosine": -torch.stack(per_view).mean().detach()})


CARD = Card(
    name="representation_alignment", kind="objective",
    title="Representation Alignment for Generation: Training Diffusion Transformers Is Easier "
          "Than You Think (REPA)",
    paper="arXiv:2410.06940",
    summary="Aligns a trainable MLP projection of the model's intermediate representation with "
            "the features of a frozen pretrained encoder by maximising their cosine similarity.",
    formula="L = weight * mean_n -cos(h_phi(h_n), y*_n); h_phi = Linear-SiLU-Linear-SiLU-Linear "
            "(projector_dim hidden); y* frozen (no gradient)",
    left_out="The diffusion / flow-matching transformer and its denoising loss (compose this "
             "objective with one), the choice of the aligned layer (the encoder publishes it as "
             "features) and the pretrained vision encoders (DINOv2 etc.: give them as a teacher "
             "or precomputed targets). REPA aligns every patch token; here the rows are samples "
             "(flatten tokens into the batch for token-level alignment: the mean is the same). "
             "The reference supports several target encoders at once (averaged); here one.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(RepresentationAlignment, card=CARD)
