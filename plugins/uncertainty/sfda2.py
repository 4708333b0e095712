"""SF(DA)^2: source-free domain adaptation through the lens of data augmentation.

Hwang, Lee, Shin and Yoon, "SF(DA)^2: Source-free Domain Adaptation Through the Lens of Data
Augmentation", ICLR 2024 (arXiv:2403.10834). Three terms on the unlabelled target data, as in
the authors' code (shinyflight/SFDA2, ``tar_adaptation.py``): spectral neighbourhood clustering
(SNC) over the augmentation graph of feature-space nearest neighbours, implicit feature
augmentation (IFA, an ISDA-style bound over Gaussian feature augmentation with class-conditional
covariances) and feature disentanglement (FD, dissimilar covariances for classes that the
predictions confuse).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor
from torch.nn import functional as F

from sdk import keys
from sdk.card import Card
from sdk.context import FromData
from sdk.distributed import Gather, gather_no_grad, gather_with_grad, resolve_gather
from sdk.errors import ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective
from sdk.state import ResizableBuffers
from sdk.types import Batch, Loss, Views, check_ids

_NAME = "sfda2"


def snc_terms(probs: Tensor, neighbour_probs: Tensor) -> tuple[Tensor, Tensor]:
    """SNC's attraction ``-1/B sum_i sum_{k in N_i} p_i^T p_k`` (the neighbours' stored
    predictions ``[B, K, C]``, no gradient) and dispersion ``1/B sum_i sum_{j != i} (p_i^T p_j)^2``
    over the batch."""
    attract = -(probs[:, None, :] * neighbour_probs).sum((1, 2)).mean()
    dots = probs @ probs.T
    disperse = (dots.square().sum(1) - dots.diagonal().square()).mean()
    return attract, disperse


def class_covariances(x: Tensor, labels: Tensor, count: Tensor, mean: Tensor, cov: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the online class-conditional covariance (ISDA's estimator, which the authors
    use): with ``n_c`` rows of class ``c`` in the batch, mean ``m_c`` and biased covariance
    ``S_c``, ``w = n_c / (n_c + N_c)``, ``Sigma_c <- (1 - w) Sigma_c + w S_c + w (1 - w)
    (mu_c - m_c)(mu_c - m_c)^T``, ``mu_c <- (1 - w) mu_c + w m_c``, ``N_c <- N_c + n_c``.
    Returns the new ``(count, mean, cov)``; ``cov`` keeps the gradient of this batch's rows."""
    onehot = F.one_hot(labels, count.shape[0]).to(x.dtype)  # [B, C]
    n = onehot.sum(0)
    m = onehot.T @ x / n.clamp_min(1)[:, None]  # [C, D]
    centred = (x[:, None, :] - m[None]) * onehot[:, :, None]  # [B, C, D]
    s = torch.einsum("bcd,bce->cde", centred, centred) / n.clamp_min(1)[:, None, None]
    w = torch.where(n > 0, n / (n + count).clamp_min(1), torch.zeros_like(n))
    diff = mean - m
    wc = w[:, None, None]
    new_cov = (1 - wc) * cov + wc * s + (wc * (1 - wc)) * diff[:, :, None] * diff[:, None, :]
    new_mean = (1 - w[:, None]) * mean + w[:, None] * m
    return count + n, new_mean.detach(), new_cov


def ifa_loss(logits: Tensor, logit_cov: Tensor, ratio: Tensor) -> Tensor:
    """IFA per sample: ``2 sum_k CE(z + sigma_k / 2, k)``, ``sigma_kj = ratio (w_j - w_k)^T
    Sigma_y (w_j - w_k)``, ``y`` the predicted class. For a linear head ``z = W f + b`` that
    quadratic form is ``S_jj + S_kk - 2 S_jk`` of the logits' class covariance ``S = W Sigma W^T``,
    which is what ``logit_cov`` ``[C, C, C]`` holds."""
    s = logit_cov[logits.argmax(1).detach()]  # [B, C, C]
    d = s.diagonal(dim1=1, dim2=2)  # [B, C]
    sigma = ratio * (d[:, :, None] + d[:, None, :] - 2 * s)  # [B, k, j]
    log_p = (logits[:, None, :] + 0.5 * sigma).log_softmax(-1)  # [B, k, C]
    return -2 * log_p.diagonal(dim1=1, dim2=2).sum(1)


def fd_loss(feature_cov: Tensor, mean_scores: Tensor) -> Tensor:
    """FD: ``-1/2 sum_{c != d} (m_c^T m_d) (1 - cos(vec Sigma_c, vec Sigma_d))``, ``m_c`` the mean
    stored prediction of the samples predicted as ``c`` (weights without gradient)."""
    c = mean_scores.shape[0]
    off_diagonal = 1 - torch.eye(c, dtype=mean_scores.dtype, device=mean_scores.device)
    weight = (mean_scores @ mean_scores.T) * off_diagonal
    v = feature_cov.flatten(1)
    norms = v.norm(dim=1)
    distance = 1 - (v @ v.T) / (norms[:, None] * norms[None, :] + 1e-12)
    return -(distance * weight.detach().to(distance.dtype)).sum() / 2


class SFDA2(ResizableBuffers, Objective):
    """SF(DA)^2 on the target features ``f`` (``Views.extras[keys.FEATURES][0]``) and logits
    (``Views.logits``) of a batch, with memory banks keyed by ``Batch.index``: the normalised
    feature, the prediction and its argmax of every target sample seen (``fill_banks`` writes
    them from the source model before adaptation, as the authors do; each call writes the
    batch's). The loss is ``SNC_attract + a_t SNC_disperse + alpha_1 IFA + alpha_2 FD`` with
    ``a_t = alpha (1 + 10 t)^(-beta)`` and IFA's scale ``lambda_0 t`` at progress
    ``t = step / max_steps`` (0 until :meth:`set_progress` is told a ``max_steps``). Neighbours:
    the ``k`` stored samples of highest cosine similarity, the sample itself excluded. Every
    statistic is over the global batch (``gather``: "auto", under DDP)."""

    requires = {"logits": True, "index": True, "extras": (keys.FEATURES,)}
    batch_coupled = True
    resizable_buffers = ("feature_bank", "score_bank", "class_count", "feature_mean", "feature_cov",
                         "logit_mean", "logit_cov")

    def __init__(self, k: Annotated[int, Ge(1)] = 5, alpha: Annotated[float, Ge(0)] = 1.0,
                 beta: Annotated[float, Ge(0)] = 5.0, alpha_1: Annotated[float, Ge(0)] = 1e-4,
                 alpha_2: Annotated[float, Ge(0)] = 10.0, lambda_0: Annotated[float, Ge(0)] = 5.0,
                 num_classes: Annotated[int | None, FromData("num_classes"), Gt(1)] = None,
                 num_samples: Annotated[int, Ge(1)] = 65536, gather: Gather = "auto"):
        super().__init__()
        self.k, self.alpha, self.beta, self.alpha_1, self.alpha_2 = k, alpha, beta, alpha_1, alpha_2
        self.lambda_0, self.num_classes, self.num_samples = lambda_0, num_classes, num_samples
        self.gather = gather
        self.register_buffer("progress", torch.zeros(()))
        self.register_buffer("feature_bank", torch.zeros(num_samples, 0))
        self.register_buffer("score_bank", torch.zeros(num_samples, 0))
        self.register_buffer("pseudo_bank", torch.zeros(num_samples, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool))
        c = 0 if num_classes is None else num_classes
        self.register_buffer("class_count", torch.zeros(c))
        self.register_buffer("feature_mean", torch.zeros(c, 0))
        self.register_buffer("feature_cov", torch.zeros(c, 0, 0))
        self.register_buffer("logit_mean", torch.zeros(c, c))
        self.register_buffer("logit_cov", torch.zeros(c, c, c))

    def set_progress(self, step: int, max_steps: int | None) -> None:
        self.progress.fill_(step / max_steps if max_steps else 0.0)

    def _inputs(self, views: Views, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        owner = f"objective {self.name!r}"
        extras = views.extras if keys.FEATURES in views.extras else batch.extras
        features = extras[keys.FEATURES]
        f = features[0] if isinstance(features, (tuple, list)) else features
        logits = views.logits
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != logits.shape[0]:
            shape = list(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ShapeError(f"{owner}: extras[{keys.FEATURES!r}] must be features [B, D] of the "
                             f"{logits.shape[0]} rows of Views.logits, got {shape}")
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ShapeError(f"{owner}: Views.logits must be [B, C] with C >= 2, got {list(logits.shape)}")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ShapeError(f"{owner}: Views.logits has {logits.shape[1]} classes, num_classes is "
                             f"{self.num_classes}")
        check_ids(owner, "Batch.index", batch.index)
        if self.feature_bank.shape[1] not in (0, f.shape[1]):
            raise ShapeError(f"{owner}: features have {f.shape[1]} columns, the bank holds "
                             f"{self.feature_bank.shape[1]}")
        return f, logits, batch.index

    def _allocate(self, f: Tensor, logits: Tensor) -> None:
        d, c = f.shape[1], logits.shape[1]
        kw = {"device": f.device, "dtype": torch.float32}
        if self.feature_bank.shape[1] == 0:
            self.feature_bank = torch.zeros(self.num_samples, d, **kw)
            self.score_bank = torch.zeros(self.num_samples, c, **kw)
        if self.feature_cov.shape[1] != d or self.logit_cov.shape[0] != c:
            self.class_count = torch.zeros(c, **kw)
            self.feature_mean = torch.zeros(c, d, **kw)
            self.feature_cov = torch.zeros(c, d, d, **kw)
            self.logit_mean = torch.zeros(c, c, **kw)
            self.logit_cov = torch.zeros(c, c, c, **kw)

    @torch.no_grad()
    def fill_banks(self, index: Tensor, features: Tensor, logits: Tensor) -> None:
        """Write normalised features, predictions and their argmax of the samples ``index``
        (the source model's pass over the target data before adaptation)."""
        f, logits, index = self._inputs(Views(logits=logits, extras={keys.FEATURES: (features,)}),
                                        Batch(index=index))
        self._allocate(f, logits)
        self._write(index, F.normalize(f.float(), dim=1), logits.float().softmax(1))

    def _write(self, index: Tensor, f_norm: Tensor, probs: Tensor) -> None:
        try:
            self.feature_bank.index_copy_(0, index, f_norm.detach().to(self.feature_bank.dtype))
            self.score_bank.index_copy_(0, index, probs.detach().to(self.score_bank.dtype))
            self.pseudo_bank.index_copy_(0, index, probs.detach().argmax(1))
            self.filled.index_fill_(0, index, True)
        except (IndexError, RuntimeError):  # ids out of range (on CPU; CUDA asserts on the device)
            check_ids(f"objective {self.name!r}", "Batch.index", index, self.num_samples)
            raise

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        """For the conformance kit: 8-wide features, 4-class logits, indices below 64."""
        f = torch.randn(batch_size, 8, generator=generator).requires_grad_()
        logits = torch.randn(batch_size, 4, generator=generator).requires_grad_()
        index = torch.randperm(64, generator=generator)[:batch_size]
        return Views(logits=logits, extras={keys.FEATURES: (f,)}), Batch(index=index)

    def forward(self, views: Views, batch: Batch) -> Loss:
        f, logits, index = self._inputs(views, batch)  # this rank's rows are checked first
        if resolve_gather(self.gather):
            f, logits, index = gather_with_grad(f), gather_with_grad(logits), gather_no_grad(index)
        self._allocate(f, logits)
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        f = f if f.dtype in (torch.float32, torch.float64) else f.float()
        probs = z.softmax(1)
        f_norm = F.normalize(f, dim=1)
        with torch.no_grad():
            self._write(index, f_norm, probs)
            if len(index) <= self.k and int(self.filled.sum()) <= self.k:  # syncs on small batches only
                raise ShapeError(f"objective {self.name!r}: k={self.k} neighbours need at least "
                                 f"{self.k + 1} samples in the bank, it holds {int(self.filled.sum())}")
            sim = f_norm.detach().to(self.feature_bank.dtype) @ self.feature_bank.T  # [B, N]
            sim = sim.masked_fill(~self.filled[None, :], float("-inf"))
            sim[torch.arange(len(index), device=sim.device), index] = float("-inf")
            neighbours = self.score_bank[sim.topk(self.k, dim=1).indices].to(probs.dtype)  # [B, K, C]
        attract, disperse = snc_terms(probs, neighbours)
        t = self.progress.to(probs.dtype)
        a_t = self.alpha * (1 + 10 * t) ** (-self.beta)
        pseudo = probs.detach().argmax(1)
        count, f_mean, f_cov = class_covariances(f, pseudo, self.class_count.to(f.dtype),
                                                 self.feature_mean.to(f.dtype), self.feature_cov.to(f.dtype))
        _, z_mean, z_cov = class_covariances(z, pseudo, self.class_count.to(z.dtype),
                                             self.logit_mean.to(z.dtype), self.logit_cov.to(z.dtype))
        ifa = ifa_loss(z, z_cov, self.lambda_0 * t).mean()
        c = z.shape[1]
        with torch.no_grad():
            onehot = F.one_hot(self.pseudo_bank, c).to(self.score_bank.dtype) * self.filled[:, None]
            mean_scores = (onehot.T @ self.score_bank) / onehot.sum(0).clamp_min(1)[:, None]
        fd = fd_loss(f_cov, mean_scores.to(f_cov.dtype))
        with torch.no_grad():
            self.class_count.copy_(count)
            self.feature_mean.copy_(f_mean)
            self.feature_cov.copy_(f_cov.detach())
            self.logit_mean.copy_(z_mean)
            self.logit_cov.copy_(z_cov.detach())
        value = attract + a_t * disperse + self.alpha_1 * ifa + self.alpha_2 * fd
        return Loss(value=value, logs={"snc_attract": attract.detach(), "snc_disperse": disperse.detach(),
                                       "ifa": ifa.detach(), "fd": fd.detach()})


CARD = Card(
    name=_NAME, kind="objective",
    title="SF(DA)^2: Source-free Domain Adaptation Through the Lens of Data Augmentation",
    paper="arXiv:2403.10834",
    summary="Source-free adaptation on unlabelled target data: predictions of feature-space "
            "nearest neighbours (the augmentation graph) are pulled together and predictions of "
            "the batch pushed apart (spectral neighbourhood clustering), an implicit Gaussian "
            "feature augmentation with class covariances regularises the classifier, and the "
            "covariances of classes the predictions confuse are pushed apart; K = 5, alpha = 1 "
            "decayed with beta = 5, alpha_1 = 1e-4, alpha_2 = 10, lambda_0 = 5 (the authors' "
            "VisDA settings).",
    formula="L = -1/B sum_i sum_{k in N_i} p_i^T s_k + alpha (1 + 10 t)^-beta 1/B sum_i sum_{j!=i} "
            "(p_i^T p_j)^2 + alpha_1 1/B sum_i 2 sum_k CE(z_i + sigma_ik / 2, k) - alpha_2 / 2 "
            "sum_{c!=d} (m_c^T m_d)(1 - cos(Sigma_c, Sigma_d)); sigma_ikj = lambda_0 t (w_j - w_k)^T "
            "Sigma_{y_i} (w_j - w_k), N_i the K nearest stored features by cosine, s_k their "
            "stored predictions",
    left_out="IFA's quadratic form is computed from the class covariance of the logits, "
             "(w_j - w_k)^T Sigma (w_j - w_k) = S_jj + S_kk - 2 S_jk with S = W Sigma W^T, which is "
             "exact for a linear head on the current batch but keeps the stored part of the "
             "covariance at the classifier it was measured with (the authors apply the current "
             "weights to stored feature covariances); a non-linear head gets the logit-space form. "
             "The attraction term drops the authors' constant sum_k s_k log s_k (no gradient); a "
             "class no stored sample predicts weighs 0 in FD (the authors' mean over an empty set "
             "is NaN). The source pre-training, the weight-normalised classifier and the SGD "
             "schedule (lr decay, per-module learning rates) are the training recipe's, not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(SFDA2, card=CARD)
