"""ViM: the virtual logit of the feature's residual off the principal space, matched to energy.

Wang, Li, Feng and Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from annotated_types import Ge
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ConfigError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector
from sdk.ood import ClassMoments, FeatureBank, energy
from sdk.state import ResizableBuffers


def principal_dim_rule(width: int) -> int:
    """The authors' principal dimension: 1000 for features of width >= 2048, 512 for >= 768,
    else half the width."""
    return 1000 if width >= 2048 else 512 if width >= 768 else width // 2


def vim_score(x: Tensor, weight: Tensor, bias: Tensor, origin: Tensor, residual_basis: Tensor,
              alpha: Tensor) -> Tensor:
    """Anomaly score ``alpha ||(x - o) R|| - logsumexp(W x + b)`` (float64 residual, float32
    energy), ``R`` ``[D, D - k]`` the orthonormal complement of the principal space."""
    x64 = x.to(residual_basis.dtype)
    residual = ((x64 - origin) @ residual_basis).norm(dim=1)
    logits = x64 @ weight.T + bias
    return (alpha * residual).float() + energy(logits)


class ViM(ResizableBuffers, Detector):
    """ViM on features, with the classifier ``head`` (an ``nn.Linear``; None: the features are
    the logits, ``W = I``, ``b = 0``). Fit: the origin ``o = -W^+ b``, the principal space of
    the uncentred second moment of ``x - o`` (streamed, float64), and ``alpha`` = mean max logit
    / mean residual norm over the fitted rows, which are kept for that mean."""

    resizable_buffers: ClassVar[tuple[str, ...]] = ("weight", "bias", "origin", "residual_basis")

    def __init__(self, head: nn.Linear | None = None,
                 principal_dim: Annotated[int, Ge(0)] | None = None):
        super().__init__()
        self.head, self.principal_dim = head, principal_dim
        self.moments = ClassMoments(f"detector {self.name!r}")
        self.bank = FeatureBank(normalize=False)
        for name in self.resizable_buffers:
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float64))

    def _classifier(self, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.head is None:
            eye = torch.eye(width, dtype=torch.float64, device=device)
            return eye, eye.new_zeros(width)
        if self.head.in_features != width:
            raise ConfigError(f"detector {self.name!r}: head takes {self.head.in_features} features, "
                              f"the fitted features have width {width}", param="head")
        bias = self.head.bias if self.head.bias is not None else torch.zeros(self.head.out_features)
        return self.head.weight.detach().double(), bias.detach().double().to(device)

    def accumulate(self, x: Tensor, labels: Tensor | None) -> None:
        self.moments.update(x)
        self.bank.add(x)

    def summarize(self) -> None:
        width = self.moments.means.shape[1]
        k = principal_dim_rule(width) if self.principal_dim is None else self.principal_dim
        if k >= width:
            raise ConfigError(f"detector {self.name!r}: principal_dim {k} must be below the feature "
                              f"width {width}", param="principal_dim")
        self.weight, self.bias = self._classifier(width, self.moments.means.device)
        self.origin = -torch.linalg.pinv(self.weight) @ self.bias
        n, shift = self.moments.total, self.moments.means[0] - self.origin
        second = (self.moments.scatter + n * torch.outer(shift, shift)) / n
        _, vectors = torch.linalg.eigh(second)  # ascending: the first D - k span the complement
        self.residual_basis = vectors[:, :width - k].contiguous()
        rows = self.bank.rows.double()
        residual = ((rows - self.origin) @ self.residual_basis).norm(dim=1).mean()
        max_logit = (rows @ self.weight.T + self.bias).amax(1).mean()
        self.alpha = max_logit / residual.clamp_min(torch.finfo(torch.float64).tiny)

    def forward(self, x: Tensor) -> Tensor:
        return vim_score(x, self.weight, self.bias, self.origin, self.residual_basis, self.alpha)


CARD = Card(
    name="vim", kind="detector",
    title="ViM: Out-Of-Distribution with Virtual-logit Matching",
    paper="arXiv:2203.10807",
    summary="The norm of the feature's residual off the principal space of in-distribution "
            "features (centred at the classifier's origin -W^+ b) as a virtual logit, scaled by "
            "alpha to match the mean max logit, minus the energy of the real logits: higher "
            "means more anomalous (the negated ViM score).",
    formula="o = -W^+ b; P = top-k eigenvectors of E[(x - o)(x - o)^T]; r(x) = ||(I - P P^T)(x - o)||; "
            "alpha = mean_i max_c z_ic / mean_i r(x_i); s(x) = alpha r(x) - log sum_c exp(z_c(x))",
    left_out="Fitting on a subset of the training set (pass the subset to fit). The fitted "
             "rows are kept until finalize() (alpha needs their residuals once the principal "
             "space is known), so memory grows with the fit set; principal_dim defaults to the "
             "authors' rule (1000 / 512 / D // 2). Under DDP each rank fits on its own rows "
             "(nothing is merged across ranks).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ViM, card=CARD)
