"""Linear separation alternating (PLS-LSA): after every epoch, choose the clean training set
with one of two detectors, alternating between them: the small-loss detector (a two-component
Gaussian mixture on the per-sample losses) and the linear separation (a logistic regression on
the standardised features, fitted to separate the mixture's confidently noisy samples from the
rest). The next epoch trains on the clean samples only.

Albert, Valmadre, Arazo, Krishna, O'Connor & McGuinness, "An accurate detection is not all you
need to combat label noise in web-noisy datasets", ECCV 2024 (arXiv:2407.05528), Sec. 3-4; the
procedure and defaults follow the authors' code (github.com/PaulAlbert31/LSA, ``detect_noise``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval, MinLen
from torch import Tensor

from sdk.calibration import fit_lbfgs
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import NotFittedError, RequirementError, ShapeError
from sdk.events import State
from sdk.hookspecs import hookimpl
from sdk.interfaces import DataSampler

OWNER = "linear_separation_alternating"
DETECTORS = ("linear", "loss")
REG_COVAR = 5e-4  # the authors' GaussianMixture(reg_covar=5e-4)


def gmm_noisy_posterior(values: Tensor, *, iters: int = 10, reg_covar: float = REG_COVAR) -> Tensor:
    """``[N]``: the posterior of the higher-mean component of a two-component 1-D Gaussian
    mixture fitted by ``iters`` EM steps to ``u = (v - min v) / (max v - min v)``, started from
    means 0 and 1, the variance of ``u`` and equal weights, with ``reg_covar`` added to each
    variance (the small-loss detector: P(noisy | loss)); 0 everywhere when all values are equal."""
    v = values.detach().double()
    span = v.max() - v.min()
    u = (v - v.min()) / span.clamp_min(torch.finfo(v.dtype).tiny)
    mean = torch.tensor([0.0, 1.0], dtype=v.dtype, device=v.device)
    var = (u.var(correction=0) + reg_covar).expand(2).clone()
    weight = torch.full((2,), 0.5, dtype=v.dtype, device=v.device)
    for _ in range(iters):
        log_p = (weight.log() - 0.5 * (torch.log(2 * torch.pi * var)
                                       + (u[:, None] - mean) ** 2 / var))
        resp = torch.softmax(log_p, dim=1)
        nk = resp.sum(0) + 10 * torch.finfo(v.dtype).eps
        mean = (resp * u[:, None]).sum(0) / nk
        var = (resp * (u[:, None] - mean) ** 2).sum(0) / nk + reg_covar
        weight = nk / nk.sum()
    log_p = weight.log() - 0.5 * (torch.log(2 * torch.pi * var) + (u[:, None] - mean) ** 2 / var)
    post = torch.softmax(log_p, dim=1)
    noisy = post.gather(1, mean.argmax().expand(v.shape[0], 1)).squeeze(1)
    return torch.where(span > 0, noisy, torch.zeros_like(noisy)).to(values.dtype)


def linear_separation(features: Tensor, noisy: Tensor, *, max_iter: int = 1000) -> Tensor:
    """``[N]`` P(noisy | x): an unpenalised, class-balanced logistic regression (weights
    ``N / (2 N_c)``) on the column-standardised ``features`` ``[N, D]`` fitted by L-BFGS to the
    boolean ``noisy`` ``[N]`` (the samples to separate from the rest), then applied to every
    row."""
    x = features.detach().double()
    std = x.std(0, correction=0)
    x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    y = noisy.to(x.dtype)
    n_pos = y.sum()
    w_row = torch.where(noisy, x.shape[0] / (2 * n_pos), x.shape[0] / (2 * (x.shape[0] - n_pos)))
    w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    b = torch.zeros((), dtype=x.dtype, device=x.device)

    def loss() -> Tensor:
        return (w_row * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).mean()

    fit_lbfgs([w, b], loss, max_iter)
    return torch.sigmoid(x @ w + b).to(features.dtype)


def detect_noisy(which: str, losses: Tensor, features: Tensor | None, *, threshold: float = 0.95,
                 gmm_iters: int = 10, max_iter: int = 1000) -> Tensor:
    """Boolean ``[N]`` noisy flags of detector ``which``: ``"loss"``: ``P_gmm(noisy | l_i) >
    threshold``; ``"linear"``: ``P_lr(noisy | x_i) > 0.5`` with the logistic regression fitted to
    separate the loss detector's noisy samples from the rest (when that detector flags none or
    all, there is nothing to separate and its flags are returned)."""
    small_loss = gmm_noisy_posterior(losses, iters=gmm_iters) > threshold
    if which == "loss":
        return small_loss
    if features is None:
        raise RequirementError(f"{OWNER}: the linear detector needs features [N, D]")
    if features.dim() != 2 or features.shape[0] != losses.shape[0]:
        raise ShapeError(f"{OWNER}: features must be [N={losses.shape[0]}, D], got "
                         f"{list(features.shape)}")
    count = int(small_loss.sum())  # offline, once per epoch
    if count in (0, losses.shape[0]):
        return small_loss
    return linear_separation(features, small_loss, max_iter=max_iter) > 0.5


def per_sample_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``[N]`` cross-entropy of class-id ``targets`` under ``logits`` ``[N, C]``, checked."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ShapeError(f"{OWNER}: the encoder's outputs must be class logits [N, C], got "
                         f"{logits.dtype} {list(logits.shape)}")
    if targets is None or targets.shape != (logits.shape[0],) or targets.is_floating_point():
        shape = None if targets is None else f"{targets.dtype} {list(targets.shape)}"
        raise ShapeError(f"{OWNER}: Batch.targets must be class ids [N={logits.shape[0]}], got "
                         f"{shape}")
    if not bool(torch.isfinite(logits).all()):  # offline, once per epoch
        raise ShapeError(f"{OWNER}: the logits hold NaN or inf (a diverged model?)")
    return F.cross_entropy(logits.float(), targets.long(), reduction="none")


class LinearSeparationAlternating(DataSampler):
    """A data-level sampler (``Trainer(sampler=...)``) that yields, every epoch, a seeded
    permutation (``seed + epoch``) of the positions currently judged clean (all of them before
    the first detection).

    At the end of every epoch ``e >= warmup`` it embeds the training set (``trainer.embed``,
    dataset order), takes the per-sample cross-entropy of the encoder's outputs (class logits)
    and, for ``"linear"``, the backbone features (``features=True``; the encoder's outputs
    otherwise), and runs detector ``schedule[e % len(schedule)]`` (:func:`detect_noisy`). The
    clean flags and the epoch are checkpointed; under DDP every rank computes the same flags
    and the Trainer gives each rank every ``world``-th position of the order.
    """

    def __init__(self,
                 schedule: Annotated[tuple[Annotated[str, one_of(DETECTORS)], ...], MinLen(1)]
                 = ("linear", "loss"),
                 threshold: Annotated[float, Interval(gt=0, lt=1)] = 0.95,
                 warmup: Annotated[int, Ge(0)] = 0, features: bool = True,
                 gmm_iters: Annotated[int, Ge(1)] = 10, max_iter: Annotated[int, Ge(1)] = 1000,
                 seed: int = 0):
        self.schedule, self.threshold, self.warmup = tuple(schedule), threshold, warmup
        self.features, self.gmm_iters, self.max_iter, self.seed = features, gmm_iters, max_iter, seed
        self.epoch = 0
        self.num_samples: int | None = None
        self.clean: Tensor | None = None

    def bind(self, dataset: Any) -> None:
        """Told the training set: every position starts clean."""
        n = len(dataset)
        if self.clean is not None and self.clean.shape[0] != n:
            raise ShapeError(f"{OWNER}: holds clean flags of {self.clean.shape[0]} samples, but "
                             f"the training set has {n} items")
        self.num_samples = n
        if self.clean is None:
            self.clean = torch.ones(n, dtype=torch.bool)

    def detect(self, epoch: int, losses: Tensor, features: Tensor | None) -> Tensor:
        """Update the clean flags from the epoch's per-sample ``losses`` ``[N]`` and
        ``features`` ``[N, D]`` with detector ``schedule[epoch % len]``; returns the noisy flags."""
        if losses.dim() != 1 or not losses.is_floating_point() or losses.shape[0] == 0:
            raise ShapeError(f"{OWNER}: losses must be floating [N] with N >= 1, got "
                             f"{losses.dtype} {list(losses.shape)}")
        if self.num_samples is not None and losses.shape[0] != self.num_samples:
            raise ShapeError(f"{OWNER}: expected losses [{self.num_samples}] in dataset order, got "
                             f"{list(losses.shape)}")
        noisy = detect_noisy(self.schedule[epoch % len(self.schedule)], losses, features,
                             threshold=self.threshold, gmm_iters=self.gmm_iters,
                             max_iter=self.max_iter)
        self.clean = ~noisy.cpu()
        return noisy

    def on_epoch_end(self, state: State) -> None:
        if state.epoch < self.warmup:
            return
        trainer = state.trainer
        logits, targets = trainer.embed(trainer.train_loader, with_targets=True)
        losses = per_sample_cross_entropy(logits, targets)
        which = self.schedule[state.epoch % len(self.schedule)]
        feats = None
        if which == "linear":
            feats = trainer.embed(trainer.train_loader, features=True) if self.features else logits
        self.detect(state.epoch, losses, feats)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.clean is None:
            raise NotFittedError(f"{OWNER}: not bound to a training set; use it in a Trainer or "
                                 "call bind(dataset)")
        kept = self.clean.nonzero().squeeze(1)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(kept[torch.randperm(kept.shape[0], generator=g)].tolist())

    def __len__(self) -> int:
        return 0 if self.clean is None else int(self.clean.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "clean": self.clean}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        clean = state.get("clean")
        if clean is not None and self.num_samples is not None and clean.shape[0] != self.num_samples:
            raise ShapeError(f"{OWNER}: the checkpointed state flags {clean.shape[0]} samples, but "
                             f"the training set has num_samples={self.num_samples}")
        self.epoch = int(state.get("epoch", 0))
        self.clean = None if clean is None else clean.clone()


CARD = Card(
    name=OWNER, kind="sampler",
    title="An accurate detection is not all you need to combat label noise in web-noisy datasets",
    paper="arXiv:2407.05528",
    summary="Noisy-label sample selection that alternates, epoch by epoch, between the small-loss "
            "detector (a 2-component GMM on the losses) and a linear separation (a logistic "
            "regression on the features separating the GMM's confident noisy samples from the "
            "rest); the sampler trains on the samples judged clean.",
    formula="u = minmax(l); P_gmm(noisy|l_i) from a 2-component 1-D GMM (10 EM steps, reg 5e-4); "
            "loss epochs: noisy_i = P_gmm > tau (tau = 0.95); linear epochs: fit class-balanced "
            "unpenalised logistic regression on standardised x to T = {P_gmm > tau} vs the rest, "
            "noisy_i = sigmoid(w.x_i + b) > 0.5; detector at epoch e = schedule[e mod 2], "
            "schedule = (linear, loss); the next epoch samples the clean positions",
    left_out="PLS's training on the detected sets (pseudo-labels and confidence weights for the "
             "noisy samples, mixup, the contrastive term) and the co-trained PLS-LSA+: here the "
             "noisy samples are dropped for the next epoch. The SimCLR pre-training of the "
             "network whose features are separated (the Trainer's encoder is used as it is) and "
             "the web-scale datasets. The GMM starts from means 0 and 1 of the min-max losses "
             "rather than sklearn's k-means start; the paper's other trusted-set options (RRL, "
             "a few trusted labels) are not offered.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LinearSeparationAlternating, card=CARD)
