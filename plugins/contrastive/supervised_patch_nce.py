"""Adaptive Supervised PatchNCE (ASP): patch-level InfoNCE between corresponding locations of
an output and its (inconsistent) ground truth, with scheduled weights that down-weight pairs
whose positive similarity is low.

Li et al., "Adaptive Supervised PatchNCE Loss for Learning H&E-to-IHC Stain Translation with
Inconsistent Groundtruth Image Pairs", MICCAI 2023, arXiv:2303.06193 (reference code
github.com/lifangda01/AdaptiveSupervisedPatchNCE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Gt, Interval
from torch import Tensor

from sdk import contrastive
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.keys import PATCHES
from sdk.types import Batch, Loss, Views

SCHEDULES = ("lambda", "linear", "sigmoid", "zero")
LOOKUPS = ("linear", "top", "uniform")


def schedule_weight(progress: float, schedule: str = "lambda", decay_start: float = 0.5) -> float:
    """``p(t)`` for training progress ``t`` in [0, 1]: ``lambda`` keeps 1 until ``decay_start``
    then falls linearly to 0; ``linear`` is ``1 - t``; ``sigmoid`` is ``1/(1+e^{10(t-0.5)})``;
    ``zero`` is always 1 (plain supervised PatchNCE)."""
    t = min(max(progress, 0.0), 1.0)
    if schedule == "lambda":
        return 1.0 if t < decay_start else (1.0 - t) / (1.0 - decay_start)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "sigmoid":
        return 1.0 / (1.0 + math.exp((t - 0.5) * 10))
    if schedule == "zero":
        return 1.0
    raise ConfigError(f"supervised_patch_nce: schedule must be one of {SCHEDULES}, got {schedule!r}",
                      param="schedule")


def adaptive_weights(positive_sim: Tensor, p: float, lookup: str = "linear") -> Tensor:
    """``w = p + (1 - p) * g(s)`` with ``g = relu`` (``linear``), ``sqrt(1 - (relu(s) - 1)^2)``
    (``top``) or 1 (``uniform``), renormalised to mean 1 over all patches; ``s`` detached."""
    s = positive_sim.detach().float()
    if lookup == "linear":
        g = s.clamp_min(0)
    elif lookup == "top":
        g = (1 - (s.clamp_min(0) - 1).pow(2)).clamp_min(0).sqrt()
    elif lookup == "uniform":
        g = torch.ones_like(s)
    else:
        raise ConfigError(f"supervised_patch_nce: lookup must be one of {LOOKUPS}, got {lookup!r}",
                          param="lookup")
    w = p + (1 - p) * g
    return w * (w.numel() / w.sum().clamp_min(torch.finfo(w.dtype).tiny))


def patch_nce(q: Tensor, k: Tensor, temperature: float = 0.07) -> tuple[Tensor, Tensor]:
    """Supervised PatchNCE per patch: for image b and location i,
    ``l_bi = -log e^{q_bi.k_bi/t} / sum_j e^{q_bi.k_bj/t}`` (j over the same image's locations).

    ``q``, ``k`` [B, P, D] are L2-normalised here; returns ``(loss [B, P], q_bi.k_bi [B, P])``.
    Similarities come from one batched matmul [B, P, P].
    """
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    b, p, _ = q.shape
    logits = torch.bmm(q, k.transpose(1, 2)) / temperature  # [B, P, P]
    eye = torch.eye(p, dtype=torch.bool, device=q.device).expand(b, p, p).reshape(b * p, p)
    loss, _ = contrastive.info_nce(logits.reshape(b * p, p), eye, ~eye)
    return loss.view(b, p), logits.diagonal(dim1=1, dim2=2).float() * temperature


def supervised_patch_nce_loss(q: Tensor, k: Tensor, *, temperature: float = 0.07, p: float = 1.0,
                              lookup: str = "linear", detach_target: bool = True) -> Tensor:
    """Mean ASP loss ``mean_bi w_bi l_bi`` of output patches ``q`` against target patches ``k``
    [B, P, D]; ``p = 1`` gives supervised PatchNCE."""
    loss, sim = patch_nce(q, k.detach() if detach_target else k, temperature)
    return (adaptive_weights(sim, p, lookup).view_as(loss) * loss).mean()


class SupervisedPatchNCE(Objective):
    """ASP loss ``L = mean_{b,i} w_bi * l_bi`` (see :func:`patch_nce`), with
    ``w_bi = p(t) + (1 - p(t)) * relu(q_bi . k_bi)`` renormalised to mean 1 and ``p(t)`` the
    ``schedule`` of training progress (told by the engine through ``set_progress``).

    Patch features come from ``Views.extras["patches"] = (output [B, P, D], target [B, P, D])``;
    without them the two views ``[B, D]`` are one image of ``B`` patches (the reference's
    all-negatives-from-the-minibatch mode). Target features are detached as in the paper.
    """

    requires: dict = {}
    batch_coupled = False  # negatives: patches of one image (without patch extras the batch is one image)

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.07,
                 schedule: Annotated[str, one_of(SCHEDULES)] = "lambda",
                 decay_start: Annotated[float, Interval(ge=0, lt=1)] = 0.5,
                 lookup: Annotated[str, one_of(LOOKUPS)] = "linear", detach_target: bool = True):
        super().__init__()
        self.temperature, self.schedule, self.decay_start = temperature, schedule, decay_start
        self.lookup, self.detach_target = lookup, detach_target
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """Output patches that require grad and ground-truth patches that do not (they are
        detached by the method), 4 patches per image."""
        q = torch.randn(batch_size, 4, 16, generator=generator).requires_grad_()
        k = q.detach() + torch.randn(batch_size, 4, 16, generator=generator)
        return (Views(embeddings=(torch.randn(batch_size, 16, generator=generator),),
                      extras={PATCHES: (q, k)}),
                Batch(targets=torch.arange(batch_size) % 3))

    def set_progress(self, step: int, max_steps: int | None) -> None:
        self.progress.fill_(step / max_steps if max_steps else 0.0)

    @property
    def p(self) -> float:
        return schedule_weight(float(self.progress), self.schedule, self.decay_start)

    def _patches(self, views: Views) -> tuple[Tensor, Tensor]:
        pair = views.extras.get(PATCHES)
        if pair is None:
            if views.n_views < 2:
                raise RequirementError("objective 'supervised_patch_nce' needs 2 views or "
                                       "Views.extras['patches'] = (output, target) [B, P, D]")
            return views.embeddings[0][None], views.embeddings[1][None]
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise ShapeError("Views.extras['patches']: expected a pair (output, target) of [B, P, D] "
                             "tensors")
        q, k = pair
        if q.dim() != 3 or q.shape != k.shape:
            raise ShapeError(f"Views.extras['patches']: expected two [B, P, D] tensors of one shape, "
                             f"got {list(q.shape)} and {list(k.shape)}")
        if views.embeddings and q.shape[0] != views.batch_size:
            raise ShapeError(f"Views.extras['patches']: batch size {q.shape[0]} does not match the "
                             f"views' {views.batch_size}")
        return q, k

    def forward(self, views: Views, batch: Batch) -> Loss:
        q, k = self._patches(views)
        loss, sim = patch_nce(q, k.detach() if self.detach_target else k, self.temperature)
        p = self.p
        w = adaptive_weights(sim, p, self.lookup).view_as(loss)
        weighted = w * loss
        per_sample = weighted.mean(dim=1) if PATCHES in views.extras else weighted.squeeze(0)
        return Loss(value=weighted.mean(), per_sample=per_sample,
                    logs={"p": torch.tensor(p), "positive_sim": sim.mean().detach(),
                          "unweighted": loss.mean().detach()})


CARD = Card(
    name="supervised_patch_nce", kind="objective",
    title="Adaptive Supervised PatchNCE Loss for Learning H&E-to-IHC Stain Translation with "
          "Inconsistent Groundtruth Image Pairs",
    paper="arXiv:2303.06193",
    summary="Patch InfoNCE between the output's and the ground truth's features at the same "
            "location (negatives: the image's other locations), with scheduled adaptive weights "
            "that trust low-similarity (misaligned) pairs less as training proceeds.",
    formula="l_bi = -log e^{q_bi.k_bi/t} / sum_j e^{q_bi.k_bj/t} (q, k L2-normalised, k detached, "
            "t=0.07); w_bi = p(t) + (1-p(t)) relu(q_bi.k_bi), w <- w / mean(w); "
            "L = mean_bi w_bi l_bi; p 'lambda': 1 before decay_start, then linear to 0",
    left_out="The CUT/CPT generator, discriminator and multi-layer patch sampling MLP (patch "
             "features are inputs here), the 'bell' weight lookup, the MIST/BCI data. Progress is "
             "step/max_steps rather than (epoch-1)/total_epochs.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SupervisedPatchNCE, card=CARD)
