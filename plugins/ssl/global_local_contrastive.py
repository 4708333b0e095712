"""Global and local contrastive losses with partition-wise positives (medical volumes).

Chaitanya, Erdil, Karani & Konukoglu, "Contrastive learning of global and local features for
medical image segmentation with limited annotations", NeurIPS 2020 (arXiv:2006.10511).

Each volume is split into ``S`` partitions along its axis; a batch holds images of several
volumes, each with its partition id ``s``. For a positive pair ``(a, p)`` of normalised
embeddings, ``l(a, p) = -log e^{s_ap / tau} / (e^{s_ap / tau} + sum_{n in N(a)} e^{s_an / tau})``
(eq. 1). The global loss (on the encoder's projections ``g_1(e(x))``, one view per augmentation)
averages ``l`` over every ordered positive pair; its strategies (Sec. 3.1):

* ``"random"`` (G^R, SimCLR): positives the other views of the image, negatives every other image;
* ``"partition_negatives"`` (G^{D-}): positives the other views of the image, negatives only
  images of other partitions;
* ``"partition"`` (G^D, the paper's and the authors' default): positives every other image (and
  view) of the same partition, of any volume; negatives the images of other partitions.

The local loss (eq. 3) is on the decoder's feature maps ``g_2(d_l(e(x)))`` ``[B, C, H, W]``,
cut into ``A x A`` regions ``f(u)`` (flattened, normalised): region ``u`` of one view is positive
with region ``u`` of another view of the same image (``"random"``, L^R) or of any image of the same
partition (``"partition"``, L^D); its negatives are the other regions ``u' != u`` of both feature
maps of the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.classification import upcast
from sdk.constraints import one_of
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ConfigError, RequirementError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.types import Batch, Loss, Views, check_ids

PARTITION = "partition"
"""``Batch.extras``: the partition id ``[B]`` of each image within its volume."""
FEATURE_MAPS = "feature_maps"
"""``Views.extras``: the decoder's feature maps of each view, a tuple of ``V`` ``[B, C, H, W]``."""

GLOBAL_STRATEGIES = ("random", "partition_negatives", "partition")
LOCAL_STRATEGIES = ("random", "partition")


def _pair_mean(s: Tensor, positive: Tensor, log_negatives: Tensor) -> Tensor:
    """Mean over the positive pairs of ``log(e^{s_ap} + N_ap) - s_ap``, ``log N_ap`` given
    (``-inf``-like where there is no negative); 0 when there is no positive pair."""
    per_pair = torch.logaddexp(s, log_negatives) - s
    count = positive.sum()
    return torch.where(positive, per_pair, 0).sum() / count.clamp_min(1)


def _neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def global_contrastive_loss(zs: Sequence[Tensor], partition: Tensor | None,
                            strategy: str = "partition", temperature: float = 0.1) -> Tensor:
    """The global loss over ``V`` views ``[B, D]`` of ``B`` images with partition ids ``[B]``
    (``None`` for ``"random"``): ``l(a, p)`` (eq. 1) averaged over every ordered positive pair of
    the ``V B`` embeddings."""
    v, b = len(zs), zs[0].shape[0]
    z = F.normalize(upcast(torch.cat(list(zs))), dim=-1)
    s = z @ z.T / temperature
    image = torch.arange(b, device=z.device).repeat(v)
    not_self = ~torch.eye(v * b, dtype=torch.bool, device=z.device)
    same_image = image[:, None] == image[None, :]
    if strategy == "random":
        positive, negative = same_image & not_self, ~same_image
    else:
        part = partition.repeat(v)
        same_part = part[:, None] == part[None, :]
        negative = ~same_part
        positive = (same_image if strategy == "partition_negatives" else same_part) & not_self
    log_neg = torch.logsumexp(torch.where(negative, s, _neg_inf(s.dtype)), dim=1, keepdim=True)
    return _pair_mean(s, positive, log_neg.expand_as(s))


def local_regions(f: Tensor, size: int) -> Tensor:
    """The ``K = (H // size) (W // size)`` non-overlapping ``size x size`` regions of feature maps
    ``[B, C, H, W]`` (a remainder at the bottom / right is dropped), flattened: ``[B, K, C size^2]``
    in row-major order of the region grid."""
    b, c = f.shape[:2]
    r = f.unfold(2, size, size).unfold(3, size, size)  # [B, C, H/A, W/A, A, A]
    return r.permute(0, 2, 3, 1, 4, 5).reshape(b, r.shape[2] * r.shape[3], c * size * size)


def local_contrastive_loss(fs: Sequence[Tensor], partition: Tensor | None,
                           strategy: str = "random", region_size: int = 3,
                           temperature: float = 0.1) -> Tensor:
    """The local loss over ``V`` views' feature maps ``[B, C, H, W]``: for every ordered pair of
    the same region ``u`` in two feature maps (of one image's views for ``"random"``, of any
    images of one partition for ``"partition"``), ``l(a, p)`` with the negatives ``N(a, p)`` the
    regions ``u' != u`` of the anchor's and of the positive's image (all their views), averaged
    over the pairs."""
    v, b = len(fs), fs[0].shape[0]
    regions = torch.stack([local_regions(upcast(f), region_size) for f in fs])  # [V, B, K, D]
    k = regions.shape[2]
    r = F.normalize(regions.reshape(v * b * k, -1), dim=-1)
    s = r @ r.T / temperature  # rows and columns ordered (view, image, region)
    dev = r.device
    image = torch.arange(b, device=dev).repeat_interleave(k).repeat(v)
    region = torch.arange(k, device=dev).repeat(v * b)
    n = v * b * k
    other_region = region[:, None] != region[None, :]
    # log sum of e^{s_an} over the regions n != region(a) of each image m (all views): [N, B]
    masked = torch.where(other_region, s, _neg_inf(s.dtype)).view(n, v, b, k)
    per_image = torch.logsumexp(masked.permute(0, 2, 1, 3).reshape(n, b, v * k), dim=-1)
    own = per_image.gather(1, image[:, None])  # [N, 1]: the anchor's image
    theirs = per_image[:, image]  # [N, N]: the positive's image
    same_image = image[:, None] == image[None, :]
    log_neg = torch.where(same_image, own.expand(n, n), torch.logaddexp(own, theirs))
    linked = same_image if strategy == "random" else (
        partition[image][:, None] == partition[image][None, :])
    not_self = ~torch.eye(n, dtype=torch.bool, device=dev)
    positive = linked & ~other_region & not_self
    return _pair_mean(s, positive, log_neg)


class GlobalLocalContrastive(Objective):
    """``L = global_weight L_g + local_weight L_l`` over ``V >= 2`` augmented views.

    ``Views.embeddings``: the global projections ``[B, D]`` of each view; ``Views.extras
    ["feature_maps"]`` (when ``local_weight > 0``): the decoder's feature maps of each view,
    ``V`` tensors ``[B, C, H, W]``, with ``H, W >= region_size``; ``Batch.extras["partition"]``
    (for the partition strategies): the partition id ``[B]`` of each image. Both terms couple the
    batch (partitions link images): ``gather`` ("auto": under DDP) computes them on the global
    batch, every rank the same loss."""

    requires = {"views": 2}
    batch_coupled = True

    def __init__(self, global_strategy: Annotated[str, one_of(GLOBAL_STRATEGIES)] = "partition",
                 local_strategy: Annotated[str, one_of(LOCAL_STRATEGIES)] = "random",
                 temperature: Annotated[float, Gt(0)] = 0.1,
                 local_temperature: Annotated[float, Gt(0)] = 0.1,
                 region_size: Annotated[int, Ge(1)] = 3,
                 global_weight: Annotated[float, Ge(0)] = 1.0,
                 local_weight: Annotated[float, Ge(0)] = 1.0, gather: Gather = "auto"):
        super().__init__()
        if global_weight == 0 and local_weight == 0:
            raise ConfigError("global_local_contrastive: global_weight and local_weight are both 0",
                              param="global_weight")
        self.global_strategy, self.local_strategy = global_strategy, local_strategy
        self.temperature, self.local_temperature = temperature, local_temperature
        self.region_size, self.gather = region_size, gather
        self.global_weight, self.local_weight = global_weight, local_weight

    def _needs_partition(self) -> bool:
        return ((self.global_weight > 0 and self.global_strategy != "random")
                or (self.local_weight > 0 and self.local_strategy != "random"))

    def _partition(self, views: Views, batch: Batch) -> Tensor | None:
        if not self._needs_partition():
            return None
        owner = f"objective {self.name!r}"
        if PARTITION not in batch.extras:
            raise RequirementError(f"{owner} needs Batch.extras[{PARTITION!r}] (the partition id "
                                   "[B] of each image in its volume) for its partition strategies")
        part = batch.extras[PARTITION]
        if not isinstance(part, Tensor):
            raise ShapeError(f"{owner}: Batch.extras[{PARTITION!r}] must be a tensor [B], got "
                             f"{type(part).__name__}")
        check_ids(owner, f"Batch.extras[{PARTITION!r}]", part)
        if part.shape[0] != views.batch_size:
            raise ShapeError(f"{owner}: Batch.extras[{PARTITION!r}] has {part.shape[0]} rows, but "
                             f"Views hold {views.batch_size} samples")
        return part

    def _feature_maps(self, views: Views) -> list[Tensor]:
        owner = f"objective {self.name!r}"
        if FEATURE_MAPS not in views.extras:
            raise RequirementError(f"{owner} with local_weight > 0 needs Views.extras"
                                   f"[{FEATURE_MAPS!r}] (the decoder's feature maps of each view)")
        fs = views.extras[FEATURE_MAPS]
        if not isinstance(fs, (tuple, list)) or len(fs) != views.n_views:
            got = len(fs) if isinstance(fs, (tuple, list)) else type(fs).__name__
            raise ShapeError(f"{owner}: Views.extras[{FEATURE_MAPS!r}] must hold {views.n_views} "
                             f"feature maps (one per view), got {got}")
        want = None
        for i, f in enumerate(fs):
            shape = tuple(f.shape) if isinstance(f, Tensor) else None
            if (shape is None or len(shape) != 4 or not f.is_floating_point()
                    or shape[0] != views.batch_size or min(shape[2:]) < self.region_size
                    or (want is not None and shape != want)):
                raise ShapeError(f"{owner}: Views.extras[{FEATURE_MAPS!r}][{i}] must be floating "
                                 f"[{views.batch_size}, C, H, W] with H, W >= region_size="
                                 f"{self.region_size}, all views alike, got "
                                 f"{list(shape) if shape else type(f).__name__}")
            want = shape
        return list(fs)

    def forward(self, views: Views, batch: Batch) -> Loss:
        part = self._partition(views, batch)
        fs = self._feature_maps(views) if self.local_weight > 0 else []
        zs = list(views.embeddings)
        if resolve_gather(self.gather):
            zs = [gather_with_grad(z) for z in zs]
            fs = [gather_with_grad(f) for f in fs]
            part = None if part is None else gather_no_grad(part)
        logs, value = {}, 0
        if self.global_weight > 0:
            g = global_contrastive_loss(zs, part, self.global_strategy, self.temperature)
            logs["global"], value = g.detach(), self.global_weight * g
        if self.local_weight > 0:
            loc = local_contrastive_loss(fs, part, self.local_strategy, self.region_size,
                                         self.local_temperature)
            logs["local"], value = loc.detach(), value + self.local_weight * loc
        return Loss(value=value, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        side = 2 * self.region_size + 1
        zs = tuple(torch.randn(batch_size, 5, generator=generator).requires_grad_() for _ in range(2))
        fs = tuple(torch.randn(batch_size, 3, side, side, generator=generator).requires_grad_()
                   for _ in range(2))
        part = torch.randint(0, 3, (batch_size,), generator=generator)
        extras = {FEATURE_MAPS: fs} if self.local_weight > 0 else {}
        return Views(embeddings=zs, extras=extras), Batch(extras={PARTITION: part})


CARD = Card(
    name="global_local_contrastive", kind="objective",
    title="Contrastive learning of global and local features for medical image segmentation with "
          "limited annotations",
    paper="arXiv:2006.10511",
    summary="A global contrastive loss on image projections whose positives are images of the same "
            "volume partition (across volumes; G^D, or G^{D-} / G^R) plus a local contrastive loss "
            "between corresponding A x A regions of decoder feature maps (L^R: the views of one "
            "image; L^D: images of one partition), the other regions being negatives.",
    formula="l(a,p) = -log e^{s_ap/tau} / (e^{s_ap/tau} + sum_{n in N(a)} e^{s_an/tau}), s = cos; "
            "L_g = mean over positive pairs (G^D: same partition; N(a): other partitions); "
            "L_l = mean over pairs (f_i(u), f_j(u)) with N = regions u' != u of f_i and f_j; "
            "L = global_weight L_g + local_weight L_l; tau = 0.1, A = 3 (authors' settings)",
    left_out="The U-Net encoder / decoder, the g_1 / g_2 heads and the volume sampling (one image "
             "per partition of each volume): the encoder / decoder provide embeddings and "
             "Views.extras['feature_maps'], the data Batch.extras['partition']. Deviations: the paper "
             "pre-trains the encoder with L_g, then the decoder with L_l (encoder frozen); here the "
             "two are one weighted sum (set a weight to 0 for either stage). The authors' code "
             "contrasts 13 hand-placed 3x3 regions against 5 nearby ones; here the feature map is "
             "cut into a grid of non-overlapping regions and all other regions of both maps are "
             "negatives. The pairwise region similarities cost O((V B K)^2) memory.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(GlobalLocalContrastive, card=CARD)
