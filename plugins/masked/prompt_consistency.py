"""GOPro: prompt learning on a frozen image-text model with three losses: cross-entropy over the
image's cosine similarity to every class's (image-conditioned) prompt, a prompt consistency loss
that keeps each class's prompt features equal across augmented views of the image, and a SimCLR
loss between two views' projected image features.

Singha, Jha and Banerjee, "GOPro: Generate and Optimize Prompts in CLIP using Self-Supervised
Learning", BMVC 2023 (arXiv:2308.11605).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.classification import target_log_prob, targets
from sdk.contrastive import contrast, instance_info_nce, per_sample, require_negatives
from sdk.distributed import Gather, gather_with_grad, resolve_gather, world_size
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views


def prompt_logits(image: Tensor, text: Tensor, logit_scale: float) -> Tensor:
    """``[B, C]``: ``logit_scale * cos(image_b, text_bc)`` for image features ``[B, D]`` and each
    sample's class prompt features ``[B, C, D]``."""
    return logit_scale * torch.einsum("bd,bcd->bc", F.normalize(image, dim=-1),
                                      F.normalize(text, dim=-1))


def prompt_consistency(text: Tensor, *others: Tensor) -> Tensor:
    """``[B]``: ``sum_v mean_{c,d} (t0_bcd - tv_bcd)^2`` over the other views' class prompt features
    (each L2-normalised over ``d``), the view-0 features ``text [B, C, D]`` the reference."""
    t0 = F.normalize(text, dim=-1)
    return sum((t0 - F.normalize(t, dim=-1)).pow(2).mean((1, 2)) for t in others)


class PromptConsistency(Objective):
    """``Views.embeddings``: two image features ``[B, embed_dim]``, the original image and its
    contrastive view (GOPro: MoCo v3's augmentation); ``Views.extras[keys.CLASS_TEXT_FEATURES]``:
    ``V_t >= 2`` text features ``[B, C, embed_dim]`` of every class's prompt conditioned on the
    original image, then on each augmented view (GOPro: the MoCo v3 view, then an AugMix view);
    ``Batch.targets``: class ids ``[B]``. Loss per sample: ``CE(prompt_logits(z_0, t_0), y) +
    consistency_weight * prompt_consistency(t_0, t_1, ...) + contrastive_weight *
    NT-Xent(g(z_0), g(z_1))`` with temperature ``temperature``, ``g`` this objective's projector
    (linear, then batch normalisation with batch statistics of each view, over every rank under
    ``gather``). The contrastive term needs two samples."""

    requires = {"views": 2, "targets": True, "extras": (keys.CLASS_TEXT_FEATURES,)}
    batch_coupled = True

    def __init__(self, embed_dim: Annotated[int, Ge(1)] = 512,
                 logit_scale: Annotated[float, Gt(0)] = 100.0,
                 consistency_weight: Annotated[float, Ge(0)] = 1.0,
                 contrastive_weight: Annotated[float, Ge(0)] = 0.1,
                 temperature: Annotated[float, Gt(0)] = 0.1, gather: Gather = "auto"):
        super().__init__()
        self.embed_dim, self.logit_scale, self.temperature = embed_dim, logit_scale, temperature
        self.consistency_weight, self.contrastive_weight = consistency_weight, contrastive_weight
        self.gather = gather
        self.projector = nn.Linear(embed_dim, embed_dim)
        self.norm_weight = nn.Parameter(torch.ones(embed_dim))
        self.norm_bias = nn.Parameter(torch.zeros(embed_dim))

    def project(self, z: Tensor, gathering: bool) -> Tensor:
        """``g(z)``: the linear layer, then ``(y - mean) / sqrt(var + 1e-5) * gamma + beta`` with the
        biased batch variance (BatchNorm1d in training), the statistics over every rank's rows
        when ``gathering``."""
        y = self.projector(z)
        full = gather_with_grad(y) if gathering else y
        mean, var = full.mean(0), full.var(0, unbiased=False)
        return (y - mean) / (var + 1e-5).sqrt() * self.norm_weight + self.norm_bias

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'prompt_consistency'"
        zs = views.embeddings
        b = zs[0].shape[0]
        if len(zs) != 2 or zs[0].shape[1] != self.embed_dim:
            raise ShapeError(f"{owner}: Views.embeddings must be two views (the original and its "
                             f"contrastive view) [B, {self.embed_dim}] (embed_dim), got {len(zs)} of "
                             f"{list(zs[0].shape)}")
        text = views.extras[keys.CLASS_TEXT_FEATURES]
        if isinstance(text, Tensor):
            text = (text,)
        shapes = [list(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in text]
        if (len(text) < 2 or any(not isinstance(t, Tensor) or not t.is_floating_point()
                                        or t.dim() != 3 or t.shape[0] != b
                                        or t.shape[2] != self.embed_dim for t in text)
                or len({t.shape for t in text}) != 1):
            raise ShapeError(f"{owner}: Views.extras[{keys.CLASS_TEXT_FEATURES!r}] must hold one "
                             f"floating [{b}, C, {self.embed_dim}] tensor per view (at least 2), "
                             f"got {shapes}")
        w = self.projector.weight
        if not torch.is_autocast_enabled(w.device.type):
            zs = tuple(z.to(w.dtype) for z in zs)
            text = tuple(t.to(w.dtype) for t in text)
        dtype = torch.promote_types(zs[0].dtype, torch.float32)
        logits = prompt_logits(zs[0], text[0], self.logit_scale).to(dtype)
        t = targets(owner, logits, batch.targets, soft=False)
        ce = -target_log_prob(logits, t)
        consistency = prompt_consistency(*(x.to(dtype) for x in text))
        gathering = resolve_gather(self.gather) and world_size() > 1
        projected = Views(embeddings=tuple(self.project(F.normalize(z, dim=-1), gathering).to(dtype)
                                           for z in zs))
        c = contrast(projected, batch, gather=self.gather)
        require_negatives(c, owner)
        contrastive = per_sample(instance_info_nce(c, self.temperature), c)
        loss = ce + self.consistency_weight * consistency + self.contrastive_weight * contrastive
        return Loss(value=loss.mean(), per_sample=loss,
                    logs={"cross_entropy": ce.mean().detach(),
                          "consistency": consistency.mean().detach(),
                          "contrastive": contrastive.mean().detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        classes = 3
        z = [torch.randn(batch_size, self.embed_dim, generator=generator).requires_grad_()
             for _ in range(2)]
        text = tuple(torch.randn(batch_size, classes, self.embed_dim, generator=generator).requires_grad_()
                     for _ in range(3))
        y = torch.randint(0, classes, (batch_size,), generator=generator)
        return (Views(embeddings=tuple(z), extras={keys.CLASS_TEXT_FEATURES: text}),
                Batch(targets=y, index=torch.arange(batch_size)))


CARD = Card(
    name="prompt_consistency", kind="objective",
    title="GOPro: Generate and Optimize Prompts in CLIP using Self-Supervised Learning",
    paper="arXiv:2308.11605",
    summary="Prompt learning on a frozen image-text model: cross-entropy over the image's scaled "
            "cosine similarity to each class's image-conditioned prompt, a consistency loss "
            "keeping each class's prompt features equal across augmented views, and SimCLR "
            "between two views' projected image features.",
    formula="l_bc = 100 cos(z0_b, t0_bc); L = CE(l_b, y_b) + 1.0 sum_{v>=1} mean_{c,d} "
            "(t0_bcd/||t0_bc|| - tv_bcd/||tv_bc||)^2 + 0.1 NT-Xent_{tau=0.1}(BN(W z0/||z0||), "
            "BN(W z1/||z1||))",
    left_out="CLIP's image and text towers (frozen) and GOPro's prompt generator (learnable "
             "context vectors shifted by style and content features of the image encoder's "
             "layers) are not here: the per-view class prompt features come in "
             "Views.extras['class_text_features'], the image features as the views. The "
             "catalogue's 'symmetric InfoNCE' is not the paper's CLIP term: it is the "
             "cross-entropy over the class prompts (CoOp-style), and the consistency is a mean "
             "squared error between the views' prompt features, as the authors' code. Defaults "
             "are the authors' code's: weights 1 and 0.1, SimCLR temperature 0.1 (SLIP's loss, "
             "equal to NT-Xent over the 2N rows), projector width 512 (ViT-B/16), logit scale "
             "100 (CLIP's). The projector's batch normalisation always uses the batch's "
             "statistics (no running estimates; the loss is a training loss). The MoCo v3 and "
             "AugMix augmentations are the data pipeline's: the AugMix view's image features enter "
             "through its prompt features only, as in the authors' code.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(PromptConsistency, card=CARD)
