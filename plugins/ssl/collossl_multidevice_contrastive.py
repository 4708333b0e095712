"""ColloSSL: time-synchronised windows of several devices as natural views, devices chosen as
positives and (weighted) negatives by their distribution distance to the anchor device.

Jain, Tang, Min, Kawsar and Mathur, "ColloSSL: Collaborative Self-Supervised Learning for Human
Activity Recognition", IMWUT 2022 (arXiv:2202.00758); defaults from the authors' code
(``closest_pos_all_neg``, ``weighted_collossl``, ``unsync_neg`` with one negative per device).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, MinLen
from torch import Tensor

from sdk.card import Card
from sdk.distributed import Gather, gather_with_grad, rank, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views

SIGMAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 100.0)
"""The authors' kernel widths: ``k(x, y) = sum_s exp(-||x - y||^2 / (2 s))``."""


def multi_kernel_mmd(x: Tensor, y: Tensor, sigmas: tuple[float, ...] = SIGMAS) -> Tensor:
    """The biased squared MMD of the rows of ``x [B, E]`` and ``y [B', E]`` under the sum of
    Gaussian kernels ``exp(-d^2 / (2 s))``: ``mean k(x, x) + mean k(y, y) - 2 mean k(x, y)``,
    clamped at 0 (the authors' ``maximum_mean_discrepancy``). In float32 or wider."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    y = y.to(x.dtype)
    beta = 1.0 / (2.0 * torch.tensor(sigmas, dtype=x.dtype, device=x.device))

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return torch.exp(-beta[:, None, None] * d2[None]).sum(0)

    return (kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()).clamp_min(0)


def device_weights(mmd: Tensor, weighted: bool = True) -> tuple[Tensor, Tensor]:
    """``(positive, weights)`` from the MMD ``[D - 1]`` of every other device to the anchor: the
    closest device is the positive; every other device, the positive included, is a negative
    of weight ``1 / MMD_d`` (``weighted``; else 1), and the positive weighs 1, all divided by
    the largest weight (the authors' closest_pos_all_neg with weighted_collossl). Returns the
    positive's position and the weights ``[1 + (D - 1)]``: the positive's, then each device's
    as a negative."""
    positive = mmd.argmin()
    negative = 1.0 / mmd.clamp_min(1e-12) if weighted else torch.ones_like(mmd)
    weights = torch.cat([torch.ones_like(mmd[:1]), negative])
    return positive, weights / weights.max()


def group_contrastive_loss(anchor: Tensor, positive: Tensor, negatives: Tensor, weights: Tensor,
                           temperature: float) -> Tensor:
    """Per anchor ``[B]``: ``-log(w_p e^{s(a_i, p_i)/tau} / (w_p e^{s(a_i, p_i)/tau} + sum_n w_n
    e^{s(a_i, n_{n,i})/tau}))`` with cosine ``s``; ``positive [B, E]`` (the positive device at
    the same time), ``negatives [N, B, E]`` (row ``i``: the negative candidate of anchor
    ``i`` on each device), ``weights [1 + N]`` (positive first)."""
    a = F.normalize(anchor.float(), dim=-1)
    pos = (a * F.normalize(positive.float(), dim=-1)).sum(-1) / temperature + weights[0].log()
    neg = (a[None] * F.normalize(negatives.float(), dim=-1)).sum(-1) / temperature \
        + weights[1:, None].log()
    return torch.logsumexp(torch.cat([pos[None], neg]), dim=0) - pos


class ColloSSL(Objective):
    """ColloSSL's group contrastive loss over ``D >= 2`` device views (``Views.embeddings[d]``:
    device ``d``'s embeddings of the same ``B`` time windows, row ``i`` of every view the same
    time). View ``anchor`` is the anchor device. Each batch (the authors' dynamic device
    selection), the MMD between the anchor's (detached) embeddings and each other device's
    ranks the devices: the closest is the positive (its window at the same time), and every
    other device, the positive included, gives each anchor one negative, its window at a random
    other time (one permutation of the batch per device), weighted by ``1 / MMD``. Batch-coupled
    (the negatives and the MMD read other rows): ``gather`` builds them over the global batch."""

    _plugin_name = "collossl_multidevice_contrastive"
    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.1, anchor: Annotated[int, Ge(0)] = 0,
                 weighted: bool = True,
                 sigmas: Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)] = SIGMAS,
                 gather: Gather = "auto"):
        super().__init__()
        self.temperature, self.anchor, self.weighted = temperature, anchor, weighted
        self.sigmas, self.gather = tuple(float(s) for s in sigmas), gather

    def select(self, views: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """``(mmd [D - 1], positive position, weights [D])`` of the non-anchor devices."""
        anchor = views[self.anchor].detach()
        others = [z.detach() for d, z in enumerate(views) if d != self.anchor]
        mmd = torch.stack([multi_kernel_mmd(anchor, z, self.sigmas) for z in others])
        positive, weights = device_weights(mmd, self.weighted)
        return mmd, positive, weights

    def forward(self, views: Views, batch: Batch) -> Loss:
        zs = views.embeddings
        if self.anchor >= len(zs):
            raise ShapeError(f"objective 'collossl_multidevice_contrastive': anchor={self.anchor} "
                             f"but only {len(zs)} device views (Views.embeddings)")
        local = views.batch_size
        if resolve_gather(self.gather):
            zs = tuple(gather_with_grad(z) for z in zs)
        b = zs[0].shape[0]
        mmd, positive, weights = self.select(zs)
        others = torch.stack([z for d, z in enumerate(zs) if d != self.anchor])  # [D - 1, B, E]
        perms = torch.stack([torch.randperm(b, device=others.device) for _ in range(others.shape[0])])
        negatives = others.gather(1, perms[..., None].expand(-1, -1, others.shape[-1]))
        per_sample = group_contrastive_loss(zs[self.anchor], others[positive], negatives, weights,
                                            self.temperature)
        if b != local:
            per_sample = per_sample[rank() * local:(rank() + 1) * local]
        logs = {"positive_device": positive.detach().float(), "mmd_min": mmd.min().detach()}
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)


CARD = Card(
    name="collossl_multidevice_contrastive", kind="objective",
    title="ColloSSL: Collaborative Self-Supervised Learning for Human Activity Recognition",
    paper="arXiv:2202.00758",
    summary="Time-synchronised windows of several devices are natural views: per batch the "
            "device closest to the anchor in MMD is the positive (same time), every other device "
            "gives a time-shuffled negative weighted by 1/MMD.",
    formula="MMD_d = mean k(a, a) + mean k(x_d, x_d) - 2 mean k(a, x_d), k = sum_s exp(-||.||^2/(2s)); "
            "p = argmin_d MMD_d; w_p = 1, w_n(d) = 1/MMD_d, all / max w; "
            "L_i = -log(w_p e^{cos(a_i, z^p_i)/tau} / (w_p e^{cos(a_i, z^p_i)/tau} "
            "+ sum_d w_n(d) e^{cos(a_i, z^d_{pi_d(i)})/tau})), tau = 0.1",
    left_out="The MMD is computed on the detached device embeddings of the batch (the authors "
             "compute it on the raw accelerometer norms of each device's windows); the device "
             "selection is this objective's step, not a separate sampler. The similarity is the "
             "cosine (the authors' TF code takes keras' CosineSimilarity loss, which is the "
             "negative cosine); their run scripts use tau = 0.05 (the parser's default, kept "
             "here, is 0.1). The IMU pipelines, the HAR convolutional encoder, the multi-anchor "
             "mode and RealWorld / Opportunity / PAMAP2 are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ColloSSL, card=CARD)
