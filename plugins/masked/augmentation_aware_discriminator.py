"""AugSelf-GAN: the discriminator also predicts the parameters of the augmentation applied to its
input, from the difference of its features of the augmented and the original sample, with the
sign of the target telling real from generated; the generator is trained to make its samples'
parameters predicted as those of a real sample.

Hou, Cao, Yuan, Zhao, Ma, Pan, Wan, Wang, Shen and Cheng, "Augmentation-Aware Self-Supervision
for Data-Efficient GAN Training", NeurIPS 2023 (arXiv:2205.15677).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, MinLen
from torch import Tensor, nn

from sdk import keys
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

PLAYERS = ("discriminator", "generator")


def grouped_mse(predicted: Tensor, target: Tensor, groups: tuple[int, ...] | None = None) -> Tensor:
    """``[B]``: the sum over parameter groups (consecutive runs of ``groups`` columns, e.g. colour 3,
    translation 2, cutout 2) of each group's mean squared error; one group when ``None``."""
    err = (predicted - target).pow(2)
    if groups is None:
        return err.mean(1)
    scale = torch.cat([torch.full((n,), 1.0 / n, dtype=err.dtype, device=err.device) for n in groups])
    return err @ scale


def augself_discriminator_loss(logits: Tensor, predicted: Tensor, params: Tensor,
                               generated: Tensor, weight: float = 1.0,
                               groups: tuple[int, ...] | None = None) -> Tensor:
    """Per sample ``[B]``: real rows ``softplus(-l) + weight * mse(p, w)``, generated rows
    ``softplus(l) + weight * mse(p, -w)`` (``l`` the adversarial logits ``[B]``, ``p`` the
    predicted and ``w`` the applied augmentation parameters ``[B, P]``, ``mse`` the
    :func:`grouped_mse`, ``generated`` bool ``[B]``)."""
    g = generated.to(logits.dtype)
    target = params * (1 - 2 * g)[:, None]  # w for real rows, -w for generated ones
    adversarial = F.softplus(-logits) * (1 - g) + F.softplus(logits) * g
    return adversarial + weight * grouped_mse(predicted, target, groups)


def augself_generator_loss(logits: Tensor, predicted: Tensor, params: Tensor,
                           generated: Tensor, weight: float = 1.0,
                           groups: tuple[int, ...] | None = None) -> Tensor:
    """Per sample ``[B]``: generated rows ``softplus(-l) + weight * (mse(p, w) - mse(p, -w))`` (the
    non-saturating loss and the pull of the prediction towards the real sign, away from the
    generated one); real rows 0 (the generator does not make them)."""
    g = generated.to(logits.dtype)
    aug = grouped_mse(predicted, params, groups) - grouped_mse(predicted, -params, groups)
    return g * (F.softplus(-logits) + weight * aug)


class AugmentationAwareDiscriminator(Objective):
    """``Views.embeddings``: the discriminator's features ``[B, embed_dim]`` of each sample before
    (view 0) and after (view 1) the augmentation whose parameters are
    ``Batch.extras[keys.AUGMENTATION_PARAMS]`` ``[B, P]``, ``P = sum(groups)`` (``groups``: how
    many parameters each augmentation has, in column order); ``Batch.extras[keys.GENERATED]``
    (bool or 0/1 ``[B]``) marks the generated samples. This objective holds the discriminator's
    two heads: the adversarial logit ``l = a(h(T(x)))`` and the parameter predictor
    ``p = phi(h(T(x)) - h(x))`` (linear layers). ``player`` chooses whose loss it is:
    :func:`augself_discriminator_loss` or :func:`augself_generator_loss` (weights
    ``discriminator_weight`` / ``generator_weight``), averaged over the batch's rows."""

    requires = {"views": 2, "extras": (keys.AUGMENTATION_PARAMS, keys.GENERATED)}
    batch_coupled = False

    def __init__(self, embed_dim: Annotated[int, Ge(1)] = 128,
                 groups: Annotated[tuple[Annotated[int, Ge(1)], ...], MinLen(1)] = (3, 2, 2),
                 discriminator_weight: Annotated[float, Ge(0)] = 1.0,
                 generator_weight: Annotated[float, Ge(0)] = 1.0,
                 player: Annotated[str, one_of(PLAYERS)] = "discriminator"):
        super().__init__()
        self.groups = tuple(int(n) for n in groups)
        self.param_dim = sum(self.groups)
        self.embed_dim, self.player = embed_dim, player
        self.discriminator_weight, self.generator_weight = discriminator_weight, generator_weight
        self.adversarial = nn.Linear(embed_dim, 1)
        self.augmentation = nn.Linear(embed_dim, self.param_dim)

    @staticmethod
    def _what(x: object) -> str:
        return f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = "objective 'augmentation_aware_discriminator'"
        h, h_aug = views.embeddings[0], views.embeddings[1]
        b = h.shape[0]
        if h.shape[1] != self.embed_dim:
            raise ShapeError(f"{owner}: Views.embeddings must be [B, {self.embed_dim}] (embed_dim), "
                             f"got {list(h.shape)}")
        params, flag = batch.extras[keys.AUGMENTATION_PARAMS], batch.extras[keys.GENERATED]
        if (not isinstance(params, Tensor) or not params.is_floating_point()
                or params.shape != (b, self.param_dim)):
            raise ShapeError(f"{owner}: Batch.extras[{keys.AUGMENTATION_PARAMS!r}] must be floating "
                             f"[{b}, {self.param_dim}] (sum of groups {self.groups}), got "
                             f"{self._what(params)}")
        if not isinstance(flag, Tensor) or flag.is_floating_point() or flag.shape != (b,):
            raise ShapeError(f"{owner}: Batch.extras[{keys.GENERATED!r}] must be bool or integer "
                             f"0/1 [{b}], got {self._what(flag)}")
        w = self.adversarial.weight
        if not torch.is_autocast_enabled(h.device.type):
            h, h_aug = h.to(w.dtype), h_aug.to(w.dtype)
        dtype = torch.promote_types(h.dtype, torch.float32)
        logits = self.adversarial(h_aug).squeeze(1).to(dtype)
        predicted = self.augmentation(h_aug - h).to(dtype)
        params, generated = params.to(dtype), flag.to(h.device).bool()
        if self.player == "discriminator":
            per_sample = augself_discriminator_loss(logits, predicted, params, generated,
                                                    self.discriminator_weight, self.groups)
        else:
            per_sample = augself_generator_loss(logits, predicted, params, generated,
                                                self.generator_weight, self.groups)
        g = generated.to(dtype)
        target = params * (1 - 2 * g)[:, None]
        return Loss(value=per_sample.mean(), per_sample=per_sample,
                    logs={"parameter_error": grouped_mse(predicted, target, self.groups).mean().detach(),
                          "real_logit": ((logits * (1 - g)).sum() / (1 - g).sum().clamp_min(1)).detach(),
                          "generated_logit": ((logits * g).sum() / g.sum().clamp_min(1)).detach()})

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        h = torch.randn(batch_size, self.embed_dim, generator=generator)
        h_aug = h + 0.5 * torch.randn(batch_size, self.embed_dim, generator=generator)
        params = torch.rand(batch_size, self.param_dim, generator=generator)
        generated = torch.arange(batch_size) % 2 == 1
        return (Views(embeddings=(h.requires_grad_(), h_aug.requires_grad_())),
                Batch(index=torch.arange(batch_size),
                      extras={keys.AUGMENTATION_PARAMS: params, keys.GENERATED: generated}))


CARD = Card(
    name="augmentation_aware_discriminator", kind="objective",
    title="Augmentation-Aware Self-Supervision for Data-Efficient GAN Training (AugSelf-GAN)",
    paper="arXiv:2205.15677",
    summary="The discriminator predicts the augmentation parameters of its input from the "
            "difference of its features of the augmented and the original sample, with target "
            "+w for real and -w for generated samples; the generator is pushed to have its "
            "samples' parameters predicted with the real sign.",
    formula="l = a(h(T_w(x))), p = phi(h(T_w(x)) - h(x)); "
            "mse = sum over augmentation groups of the group's mean squared error; "
            "L_D = softplus(-l_real) + softplus(l_gen) + 1.0 [mse(p_real, w) + mse(p_gen, -w)]; "
            "L_G = softplus(-l_gen) + 1.0 [mse(p_gen, w) - mse(p_gen, -w)]",
    left_out="The GAN itself (StyleGAN2 / BigGAN generator and discriminator trunks), the "
             "differentiable augmentations (DiffAugment's colour, translation and cutout, 7 "
             "parameters normalised to [0, 1]: the default groups (3, 2, 2)) and the alternating "
             "generator / discriminator updates are not here: the discriminator's trunk is the "
             "encoder, the augmentation parameters come in Batch.extras['augmentation_params'], "
             "and `player` chooses whose loss a run computes. The authors' code gives each "
             "augmentation group its own linear head; one linear head over all parameters is "
             "the same map, and the error is the sum of each group's mean, as theirs. The loss "
             "is the mean over the batch's rows (real and generated together), so with equal "
             "halves it is half the authors' sum of the real and the generated means; real "
             "rows add 0 to the generator's loss. Weights 1 and 1 are the authors' StyleGAN2 "
             "defaults (D_augself, G_augself). The R1 penalty and path-length regulariser of "
             "StyleGAN2 are not part of this loss.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(AugmentationAwareDiscriminator, card=CARD)
