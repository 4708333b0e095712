"""Neural characteristic function discrepancy (NCFD) for dataset distillation: match the
characteristic functions of real and synthetic features at frequencies that a sampling network
chooses to maximise the discrepancy (a minmax game), the discrepancy combining the difference of
the amplitudes and of the phases.

Wang, Yang, Wu, Liu, Zhang, Zhou & You, "Dataset Distillation with Neural Characteristic
Function: A Minmax Perspective", CVPR 2025 (arXiv:2502.20653); checked against the authors' code
(github.com/gszfwsb/NCFM: ``NCFM/NCFM.py``'s CF loss, ``NCFM/SampleNet.py``'s sampling network).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk.adversarial import reverse_gradient
from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Input, Objective
from sdk.types import Batch, Loss, Views, check_ids

REAL, SYNTHETIC = 0, 1
"""``Batch.domain`` ids of the real and the synthetic rows."""


def characteristic_function(x: Tensor, t: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The empirical characteristic function ``Phi(t) = mean_j exp(i t.x_j)`` of the rows of ``x``
    ``[N, D]`` at the frequencies ``t`` ``[T, D]``: its real and imaginary parts ``[T]``; with
    ``weight`` ``[N, C]`` (0/1 memberships), one function per column ``[T, C]``."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, t.dtype), torch.float32)
    tx = t.to(dtype) @ x.to(dtype).T
    if weight is None:
        return tx.cos().mean(1), tx.sin().mean(1)
    weight = weight.to(dtype)
    n = weight.sum(0).clamp_min(1)
    return tx.cos() @ weight / n, tx.sin() @ weight / n


def cf_discrepancy(r_re: Tensor, r_im: Tensor, s_re: Tensor, s_im: Tensor, alpha: float = 0.5,
                   beta: float = 0.5) -> Tensor:
    """``mean_t sqrt(alpha (|Phi_R| - |Phi_S|)^2 + beta 2 (|Phi_R||Phi_S| - Re Phi_R Re Phi_S -
    Im Phi_R Im Phi_S))`` over the first dimension, the phase term clamped at 1e-12 (as the
    authors' code); for ``alpha = beta`` it is ``sqrt(alpha) mean_t |Phi_R(t) - Phi_S(t)|``."""
    tiny = torch.finfo(r_re.dtype).tiny  # |Phi| of an empty set is 0: a finite gradient there
    r_amp = torch.sqrt((r_re ** 2 + r_im ** 2).clamp_min(tiny))
    s_amp = torch.sqrt((s_re ** 2 + s_im ** 2).clamp_min(tiny))
    amplitude = (r_amp - s_amp) ** 2
    phase = (2 * (r_amp * s_amp - r_re * s_re - r_im * s_im)).clamp_min(1e-12)
    return torch.sqrt(alpha * amplitude + beta * phase).mean(0)


def ncfd(real: Tensor, synthetic: Tensor, t: Tensor, alpha: float = 0.5, beta: float = 0.5) -> Tensor:
    """The discrepancy :func:`cf_discrepancy` of the characteristic functions of ``real`` and
    ``synthetic`` ``[N, D]`` at ``t`` ``[T, D]`` (features as given: not normalised here)."""
    return cf_discrepancy(*characteristic_function(real, t), *characteristic_function(synthetic, t),
                          alpha, beta)


class SampleNet(nn.Module):
    """The frequency sampler: ``num_freqs // 16`` white-noise rows (variance ``t_var``) through
    three ``Linear + BatchNorm`` layers (LeakyReLU 0.2, LeakyReLU 0.2, Tanh), each output row
    repeated to ``num_freqs`` frequencies ``[num_freqs, D]``; fewer than 16 frequencies: Gaussian
    frequencies of variance ``t_var / D`` without a network (the authors' fallback)."""

    def __init__(self, feature_dim: int, num_freqs: int, t_var: float):
        super().__init__()
        self.feature_dim, self.num_freqs, self.t_var = feature_dim, num_freqs, t_var
        self.rows = num_freqs // 16
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim),
                       nn.LeakyReLU(0.2) if i < 2 else nn.Tanh()]
        self.net = nn.Sequential(*layers) if self.rows else None

    def forward(self, device: torch.device) -> Tensor:
        if self.net is None:
            return torch.randn(self.num_freqs, self.feature_dim, device=device) * (
                (self.t_var / self.feature_dim) ** 0.5)
        dtype = self.net[0].weight.dtype
        noise = torch.randn(self.rows, self.feature_dim, device=device, dtype=dtype) * self.t_var ** 0.5
        return self.net(noise).repeat(-(-self.num_freqs // self.rows), 1)[:self.num_freqs]


class NCFD(Objective):
    """NCFM's matching loss between the real rows (``Batch.domain == 0``) and the synthetic rows
    (``== 1``) of one batch, on their L2-normalised features ``Views.embeddings[0]`` ``[B, D]``;
    the real features are detached (the feature extractor is fixed; the synthetic samples are
    what learns). With class ids ``Batch.targets`` the discrepancy is taken per class and averaged
    over the classes present in both sets (the authors match class by class); without, over the
    whole sets. The frequencies come from the sampling network (``minmax=True``), through a
    gradient-reversal layer: the one optimizer that descends the loss in the synthetic samples
    ascends it in the sampler's parameters; ``minmax=False`` draws Gaussian frequencies
    ``N(0, t_var / D)``. Rows of other domains take no part; a batch without a class present
    in both sets gives 0 (``logs["classes_matched"]``). ``num_classes`` (filled from the data)
    sizes the per-class sums; without it the largest class id is read once per call. ``gather``
    ("auto": under DDP) matches the global batch."""

    requires = {"views": 1, "domain": True}
    consumes = frozenset({Input.LABELS})
    batch_coupled = True

    def __init__(self, feature_dim: Annotated[int, Ge(1)] = 64,
                 num_freqs: Annotated[int, Ge(1)] = 64,
                 alpha: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 beta: Annotated[float, Interval(ge=0, le=1)] = 0.5,
                 t_var: Annotated[float, Gt(0)] = 1.0,
                 minmax: bool = True,
                 num_classes: Annotated[int | None, FromData("num_classes")] = None,
                 gather: Gather = "auto"):
        super().__init__()
        self.feature_dim, self.alpha, self.beta, self.minmax, self.gather = (
            feature_dim, alpha, beta, minmax, gather)
        self.sampling_net = SampleNet(feature_dim, num_freqs, t_var) if minmax else None
        self.num_freqs, self.t_var, self.num_classes = num_freqs, t_var, num_classes

    def frequencies(self, device: torch.device) -> Tensor:
        """``[num_freqs, D]``: the sampling network's, gradient reversed (``minmax``), or Gaussian."""
        if self.sampling_net is None:
            return torch.randn(self.num_freqs, self.feature_dim, device=device) * (
                (self.t_var / self.feature_dim) ** 0.5)
        return reverse_gradient(self.sampling_net(device))

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {self.name!r}"
        z, domain, y = views.embeddings[0], batch.domain, batch.targets
        if z.dim() != 2 or z.shape[1] != self.feature_dim:
            raise ShapeError(f"{owner}: Views.embeddings[0] must be features [B, {self.feature_dim}] "
                             f"(feature_dim={self.feature_dim}), got {list(z.shape)}")
        check_ids(owner, "Batch.domain", domain)
        if y is not None:
            check_ids(owner, "Batch.targets", y)
        if resolve_gather(self.gather):
            z, domain = gather_with_grad(z), gather_no_grad(domain)
            y = None if y is None else gather_no_grad(y)
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        classes = torch.zeros_like(domain) if y is None else y.long()
        c = self.num_classes or int(classes.max()) + 1  # one host read without num_classes
        try:
            onehot = F.one_hot(classes, c).to(z.dtype)
        except RuntimeError:  # ids out of range (on CPU; CUDA asserts on the device)
            check_ids(owner, "Batch.targets", classes, c)
            raise
        w_real = onehot * (domain == REAL)[:, None]
        w_syn = onehot * (domain == SYNTHETIC)[:, None]
        t = self.frequencies(z.device)
        per_class = cf_discrepancy(*characteristic_function(z.detach(), t, w_real),
                                   *characteristic_function(z, t, w_syn), self.alpha, self.beta)
        present = (w_real.sum(0) > 0) & (w_syn.sum(0) > 0)
        value = (per_class * present).sum() / present.sum().clamp_min(1)
        return Loss(value=value, logs={"classes_matched": present.sum().detach()})

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: features, alternating real / synthetic rows, two classes."""
        z = torch.randn(batch_size, self.feature_dim, generator=g).requires_grad_()
        rows = torch.arange(batch_size)
        return Views(embeddings=(z,)), Batch(domain=rows % 2, targets=(rows // 2) % 2)


CARD = Card(
    name="ncfd", kind="objective",
    title="Dataset Distillation with Neural Characteristic Function: A Minmax Perspective",
    paper="arXiv:2502.20653",
    summary="NCFM's matching loss: the discrepancy between the characteristic functions of real and "
            "synthetic features (amplitude and phase terms) at frequencies from a sampling network "
            "that ascends it while the synthetic samples descend it (gradient reversal).",
    formula="Phi_X(t) = mean_j e^{i t.x_j} (x L2-normalised); NCFD = mean_t sqrt(alpha (|Phi_R| - "
            "|Phi_S|)^2 + beta 2 (|Phi_R||Phi_S| - Re Phi_R Re Phi_S - Im Phi_R Im Phi_S)), alpha = "
            "beta = 0.5; per class, averaged; min_syn max_sampler NCFD; t = SampleNet(noise), "
            "64 frequencies",
    left_out="The distillation pipeline around the loss: the synthetic images as learnable tensors "
             "(any encoder whose parameters are the synthetic set can carry them), the pretrained "
             "feature extractors, differentiable augmentation, the calibration cross-entropy of "
             "the synthetic set and the factorised image parametrisation. The authors' constant "
             "factor 300 on the loss is left to the objective algebra (300 * ncfd). The authors "
             "train the sampling network with its own optimizer; here one optimizer drives both "
             "through the gradient-reversal layer. The callback part of the catalogue entry is not "
             "implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(NCFD, card=CARD)
