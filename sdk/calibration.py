"""Machinery the post-hoc calibrators share: fit-time input checks, fitted-state checks, the
full-batch L-BFGS fit of affine maps (vector / matrix scaling, Dirichlet calibration, beta
calibration), one-vs-rest recombination and the bin convention of the binning calibrators.

``sdk.interfaces.Calibrator`` already checks shapes, dtypes, label range and typed scores; what
is added here reads the values (``fit`` is offline, so the host syncs are paid once per fit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk.errors import NotFittedError, ShapeError
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

FIT_DTYPE = torch.float64
"""The dtype calibrators fit in (deterministic, and well conditioned for L-BFGS)."""

LOG_EPS = 1e-12
"""Probabilities are clamped to ``[LOG_EPS, 1]`` before a logarithm (log-probabilities of
Dirichlet calibration, the features of beta calibration)."""


def owner(cal) -> str:
    return f"calibrator {cal.name!r}"


def check_fit_inputs(cal, scores: Tensor, labels: Tensor) -> None:
    """``fit``'s scores must be finite (probabilities in ``[0, 1]``) and at least two classes
    (both relevance values of ``"similarities"``) must be present among ``labels``; regression
    targets must be finite. Raises :class:`~sdk.errors.ShapeError` naming the calibrator and
    the argument."""
    who = owner(cal)
    if not bool(torch.isfinite(scores).all()):
        raise ShapeError(f"{who}: fit's scores hold NaN or inf ({list(scores.shape)}); a calibrator "
                         "cannot be fitted on them")
    if cal.inputs == "probabilities":
        low, high = (float(v) for v in torch.aminmax(scores.float()))
        if low < 0 or high > 1:
            raise ShapeError(f"{who}: fit's scores are probabilities and must lie in [0, 1], got "
                             f"the range [{low:.4g}, {high:.4g}] (logits? this calibrator takes "
                             "probabilities)")
    if cal.inputs == "regression":
        if not bool(torch.isfinite(labels).all()):
            raise ShapeError(f"{who}: fit's labels (regression targets) hold NaN or inf")
        return
    present = torch.unique(labels)
    if present.numel() < 2:
        raise ShapeError(f"{who}: labels hold one class only (class {int(present[0])} of "
                         f"{cal.label_classes(scores)}); fitting a calibrator needs at least two "
                         "classes present")


RECIPE_INPUTS = ("logits", "probabilities", "features")
"""The calibrator inputs a recipe (``paperplug run``) can give: the model's class scores, their
softmax, or the representation the class scores are read from."""


def check_recipe_calibrator(cal, *, supervised: bool, encoder: Any) -> None:
    """Raise :class:`~sdk.errors.ConfigError` (key ``calibrator``) unless a recipe can fit
    ``cal``: its ``inputs`` in :data:`RECIPE_INPUTS`, nothing more needed at fit time
    (``fit_requires``), and for ``"features"`` in a supervised recipe an encoder with
    ``features(x)``."""
    from sdk.errors import ConfigError

    who = owner(cal)
    if cal.inputs not in RECIPE_INPUTS:
        raise ConfigError(f"calibrator: {who} takes {cal.inputs!r} scores; a recipe calibrates "
                          f"class scores ({', '.join(RECIPE_INPUTS)}): fit it from Python",
                          path="calibrator")
    if cal.fit_requires:
        raise ConfigError(f"calibrator: {who} needs {sorted(cal.fit_requires)} at fit time, which "
                          "a recipe's data source does not give: fit it from Python",
                          path="calibrator")
    if cal.inputs == "features" and supervised and not callable(getattr(encoder, "features", None)):
        raise ConfigError(f"calibrator: {who} takes features, and the encoder "
                          f"({type(encoder).__name__}) has no features(x) to give them",
                          path="calibrator")


def recipe_scores(cal, logits: Tensor, features: Tensor | None) -> Tensor:
    """What a recipe gives ``cal``: ``Logits(logits)``, the softmax of ``logits`` as
    ``Probabilities``, or ``features`` ``[N, D]``, as its ``inputs`` declares."""
    from sdk.types import Logits, Probabilities

    if cal.inputs == "logits":
        return Logits(logits)
    if cal.inputs == "probabilities":
        return Probabilities(logits.softmax(-1))
    return features


def check_fitted(cal, x: Tensor, num_classes: int) -> None:
    """``x`` ``[N, C]`` must have the width the calibrator was fitted on (0: never fitted)."""
    if num_classes == 0:
        raise NotFittedError(f"{owner(cal)}: call fit(scores, labels) before calibrating")
    if x.shape[1] != num_classes:
        raise ShapeError(f"{owner(cal)}: its input has {x.shape[1]} classes {list(x.shape)}, but "
                         f"it was fitted on {num_classes}")


def log_probs(probs: Tensor) -> Tensor:
    """``log(max(p, LOG_EPS))`` in :data:`FIT_DTYPE`."""
    return probs.to(FIT_DTYPE).clamp_min(LOG_EPS).log()


def fit_lbfgs(params: Sequence[Tensor], loss: Callable[[], Tensor], max_iter: int) -> None:
    """Minimise ``loss()`` over ``params`` (leaf tensors, updated in place) with full-batch
    L-BFGS and a strong-Wolfe line search: deterministic (no sampling, no learning-rate
    schedule), float64 by the callers' choice."""
    params = [p.requires_grad_(True) for p in params]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    for p in params:
        p.requires_grad_(False)


def fit_affine(x: Tensor, labels: Tensor, *, full: bool, reg_lambda: float = 0.0,
               reg_mu: float = 0.0, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Fit ``softmax(W x + b)`` (``full``) or ``softmax(w * x + b)`` by minimising

    ``mean_i NLL_i + lambda / (C (C - 1)) sum_{j != k} W_jk^2 + mu / C sum_j b_j^2``

    (the off-diagonal and intercept regularisation, ODIR, of Kull et al. 2019) from the
    identity map. Returns ``(W [C, C] or w [C], b [C])`` in :data:`FIT_DTYPE`."""
    x = x.to(FIT_DTYPE)
    c = x.shape[1]
    eye = torch.eye(c, dtype=FIT_DTYPE, device=x.device)
    weight = eye.clone() if full else torch.ones(c, dtype=FIT_DTYPE, device=x.device)
    bias = torch.zeros(c, dtype=FIT_DTYPE, device=x.device)
    off = 1 - eye

    def loss() -> Tensor:
        z = x @ weight.T + bias if full else x * weight + bias
        value = F.cross_entropy(z, labels)
        if full and c > 1 and reg_lambda > 0:
            value = value + reg_lambda / (c * (c - 1)) * (weight * off).pow(2).sum()
        if reg_mu > 0:
            value = value + reg_mu / c * bias.pow(2).sum()
        return value

    fit_lbfgs([weight, bias], loss, max_iter)
    return weight.detach(), bias.detach()


def one_vs_rest(q: Tensor, probs: Tensor) -> Tensor:
    """Calibrated probabilities from one-vs-rest estimates ``q [N, C]`` of ``P(y = c | p_c)``:
    with two classes the binary calibrator of class 1 (``[1 - q_1, q_1]``), otherwise ``q``
    renormalised per row (Zadrozny & Elkan 2002); a row whose estimates are all zero keeps the
    uncalibrated ``probs``."""
    if q.shape[1] == 2:
        q1 = q[:, 1]
        return torch.stack([1 - q1, q1], dim=1)
    total = q.sum(dim=1, keepdim=True)
    return torch.where(total > 0, q / total.clamp_min(torch.finfo(q.dtype).tiny), probs.to(q.dtype))


def bin_index(values: Tensor, edges: Tensor) -> Tensor:
    """Index of the right-closed bin ``(e_{b-1}, e_b]`` of each value for sorted interior
    ``edges`` ``[..., B - 1]`` (batched over leading dimensions, as ``values [..., N]``); values at
    or below the first edge go to bin 0 (the convention of :mod:`sdk.metrics`)."""
    return torch.searchsorted(edges.contiguous(), values.contiguous(), right=False)


class AffineCalibrator(ResizableBuffers, Calibrator):
    """``softmax(W x + b)`` (``full``) or ``softmax(w * x + b)`` on ``x`` = the logits, or the
    log-probabilities where ``inputs = "probabilities"`` (Dirichlet calibration), fitted by
    :func:`fit_affine`. Subclasses set ``full`` and ``inputs``; this ``__init__`` takes the ODIR
    penalties (a subclass without them overrides it); the fitted ``weight`` and ``bias`` are
    float64 buffers."""

    full: ClassVar[bool] = True
    resizable_buffers = ("weight", "bias")

    def __init__(self, reg_lambda: Annotated[float, Ge(0)] = 0.0,
                 reg_mu: Annotated[float, Ge(0)] = 0.0, max_iter: Annotated[int, Ge(1)] = 500):
        super().__init__()
        self.reg_lambda, self.reg_mu, self.max_iter = reg_lambda, reg_mu, max_iter
        self.register_buffer("weight", torch.zeros(0, dtype=FIT_DTYPE))
        self.register_buffer("bias", torch.zeros(0, dtype=FIT_DTYPE))

    def _features(self, scores: Tensor) -> Tensor:
        return log_probs(scores) if self.inputs == "probabilities" else scores.to(FIT_DTYPE)

    def fit(self, scores: Tensor, labels: Tensor, **extra: Any) -> AffineCalibrator:
        check_fit_inputs(self, scores, labels)
        weight, bias = fit_affine(self._features(scores.detach()), labels.to(scores.device),
                                  full=self.full, reg_lambda=self.reg_lambda, reg_mu=self.reg_mu,
                                  max_iter=self.max_iter)
        self.weight, self.bias = weight.to(self.bias.device), bias.to(self.bias.device)
        return self

    def forward(self, scores: Tensor) -> Tensor:
        check_fitted(self, scores, self.bias.numel())
        x = self._features(scores)
        z = x @ self.weight.T + self.bias if self.full else x * self.weight + self.bias
        out = z.softmax(dim=-1) if self.inputs == "probabilities" else z
        return out.to(scores.dtype)


def fit_linear_head(x: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float = 0.0,
                    max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """A softmax classifier ``x W^T + b`` on features ``x [N, D]`` fitted to class ids
    ``labels [N]`` by minimising ``mean_i CE_i + weight_decay ||W||^2`` with :func:`fit_lbfgs`
    from zero (deterministic); returns ``(W [C, D], b [C])`` in :data:`FIT_DTYPE`
    (``rcal_gaussian_feature_sampling``, ``domain_specific_heads``)."""
    x = x.to(FIT_DTYPE)
    weight = torch.zeros(num_classes, x.shape[1], dtype=FIT_DTYPE, device=x.device)
    bias = torch.zeros(num_classes, dtype=FIT_DTYPE, device=x.device)

    def loss() -> Tensor:
        value = F.cross_entropy(x @ weight.T + bias, labels)
        return value + weight_decay * weight.pow(2).sum() if weight_decay > 0 else value

    fit_lbfgs([weight, bias], loss, max_iter)
    return weight.detach(), bias.detach()
