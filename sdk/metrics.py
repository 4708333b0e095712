"""Evaluation metrics: prediction quality, calibration and representation quality.

Functions take tensors on any device and return Python floats. Each prediction metric also
has a streaming :class:`~sdk.interfaces.Metric` (``update`` / ``compute`` / ``reset``) that
accumulates float64 sufficient statistics on the device of its inputs, so its memory does not
grow with the data, and whose ``compute`` equals the one-shot function on the concatenation
of everything passed to ``update``.

Conventions
    * ``probs`` is ``[N, C]`` (rows sum to one), ``labels`` is ``[N]`` integer class ids.
    * Calibration bins are equal-width on [0, 1] and closed on the right:
      bin ``b`` (1-based) holds ``(b-1)/M < p <= b/M`` and ``p = 0`` joins the first bin.
      This is the convention of the reference code of Guo et al. (2017)
      (``confidence > lower and confidence <= upper``). netcal's histogram bins are closed on
      the left instead (``lower <= p < upper``); the two differ only for a value lying exactly
      on an interior edge.
    * Embedding metrics L2-normalise rows where their paper does (kNN, alignment,
      uniformity); RankMe and the linear probe use the raw embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Interval
from torch import Tensor

from sdk.errors import ConfigError, NotFittedError, ShapeError
from sdk.interfaces import Metric

_STAT = torch.float64  # dtype of accumulated statistics

__all__ = [
    "accuracy", "nll", "brier", "calibration_bins", "ece", "mce", "classwise_bins",
    "classwise_ece", "knn_predict", "knn_accuracy", "LinearProbeClassifier", "fit_linear_probe",
    "linear_probe_accuracy", "alignment", "uniformity", "rankme",
    "Accuracy", "NLL", "Brier", "ECE", "MCE", "ClasswiseECE", "KNNAccuracy", "LinearProbe",
    "Alignment", "Uniformity", "RankMe",
    "adaptive_ece", "aurc", "set_size", "set_coverage", "AdaptiveECE", "AURC", "SetSize", "SetCoverage",
]


# validation -------------------------------------------------------------------------------------
def _positive(name: str, param: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: {param} must be > 0, got {value}", param=param)


def _at_least(name: str, param: str, value: int, low: int = 1) -> None:
    if value < low:
        raise ConfigError(f"{name}: {param} must be >= {low}, got {value}", param=param)


def _real(x: Tensor) -> Tensor:
    """Half-precision inputs are measured in float32; float32/float64 are kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_scores(name: str, scores: Tensor, labels: Tensor) -> None:
    if scores.dim() != 2:
        raise ShapeError(f"{name}: scores must be [N, C], got {list(scores.shape)}")
    if labels.shape != (scores.shape[0],):
        raise ShapeError(f"{name}: labels must be [{scores.shape[0]}] class ids, "
                         f"got {list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ShapeError(f"{name}: labels must be integer class ids, got dtype {labels.dtype}")
    n_classes = scores.shape[1]
    if labels.numel() and bool((labels < 0).any() | (labels >= n_classes).any()):
        raise ShapeError(f"{name}: labels must lie in [0, {n_classes}) for scores "
                         f"{list(scores.shape)}, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def _check_embeddings(name: str, z: Tensor, labels: Tensor | None = None, what: str = "z") -> None:
    if z.dim() != 2:
        raise ShapeError(f"{name}: {what} must be [N, D], got {list(z.shape)}")
    if labels is not None:
        if labels.shape != (z.shape[0],):
            raise ShapeError(f"{name}: labels of {what} must be [{z.shape[0]}], "
                             f"got {list(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ShapeError(f"{name}: labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and bool((labels < 0).any()):
            raise ShapeError(f"{name}: labels of {what} must be class ids >= 0, got "
                             f"{int(labels.min())}")


def _nan_if_any_nan(x: Tensor) -> Tensor:
    """0, or NaN when ``x`` holds a NaN (float64, on ``x``'s device, without a host sync): added
    to a statistic that would otherwise measure a NaN as if it were a number."""
    return torch.where(x.isnan().any(), math.nan, 0.0).to(_STAT)


def _check_finite(name: str, what: str, z: Tensor) -> None:
    """A fitted metric's training rows must be finite (read once per fit: a host sync)."""
    if not bool(torch.isfinite(z).all()):
        raise ShapeError(f"{name}: {what} holds NaN or inf; a fit on them would measure nothing")


def _ratio(num: Tensor, den: Tensor) -> float:
    """``num / den`` as a float; NaN when nothing was measured."""
    den = float(den)
    return float(num) / den if den > 0 else math.nan


# accuracy, NLL, Brier ---------------------------------------------------------------------------
def _accuracy_stats(scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
    _check_scores("accuracy", scores, labels)
    correct = (scores.argmax(dim=1) == labels).to(_STAT).sum()
    correct = correct + _nan_if_any_nan(scores)  # argmax would take a NaN for the largest score
    return {"correct": correct, "total": torch.tensor(float(labels.numel()), dtype=_STAT,
                                                      device=labels.device)}


def accuracy(logits_or_probs: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose argmax equals the label: ``mean_i [argmax_c s_ic == y_i]``."""
    s = _accuracy_stats(logits_or_probs, labels)
    return _ratio(s["correct"], s["total"])


def _nll_stats(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    _check_scores("nll", probs, labels)
    probs = _real(probs)
    p_true = probs.gather(1, labels.long()[:, None]).squeeze(1)
    loss = -torch.log(p_true.clamp_min(torch.finfo(probs.dtype).eps))
    return {"sum": loss.to(_STAT).sum(),
            "count": torch.tensor(float(labels.numel()), dtype=_STAT, device=labels.device)}


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood ``-mean_i log p_{i, y_i}``.

    Probabilities below the machine epsilon of their dtype are clipped to it (as scikit-learn's
    ``log_loss``), so a confident mistake costs a large but finite amount.
    """
    s = _nll_stats(probs, labels)
    return _ratio(s["sum"], s["count"])


def _brier_stats(probs: Tensor, labels: Tensor) -> dict[str, Tensor]:
    _check_scores("brier", probs, labels)
    probs = _real(probs)
    onehot = F.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)
    per_sample = (probs - onehot).pow(2).sum(dim=1)
    return {"sum": per_sample.to(_STAT).sum(),
            "count": torch.tensor(float(labels.numel()), dtype=_STAT, device=labels.device)}


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score (Brier 1950): ``mean_i sum_c (p_ic - [y_i = c])^2``.

    Summed over classes and averaged over samples, so it lies in [0, 2]; it is neither halved
    nor divided by the number of classes (scikit-learn's multiclass ``brier_score_loss`` with
    ``scale_by_half=False``).
    """
    s = _brier_stats(probs, labels)
    return _ratio(s["sum"], s["count"])


# calibration ------------------------------------------------------------------------------------
def _bin_index(values: Tensor, n_bins: int) -> Tensor:
    """Index of the right-closed equal-width bin ``((b-1)/M, b/M]`` holding each value; values at or
    below 0 go to the first bin, values above 1 (rounding) to the last."""
    inner = torch.linspace(0, 1, n_bins + 1, dtype=values.dtype, device=values.device)[1:-1]
    return torch.bucketize(values, inner, right=False)


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = 15, *,
                     name: str = "calibration_bins") -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin statistics of the top-label confidence, float64 tensors ``[n_bins]``:
    ``(count, sum of confidences, number correct)``. Reliability diagrams plot
    ``correct / count`` against ``confidence / count``. ``name``: the metric its errors name."""
    _at_least("calibration_bins", "n_bins", n_bins)
    _check_scores(name, probs, labels)
    conf, pred = _real(probs).max(dim=1)
    b = _bin_index(conf, n_bins)
    zeros = torch.zeros(n_bins, dtype=_STAT, device=probs.device)
    count = zeros.index_add(0, b, torch.ones_like(conf, dtype=_STAT))
    conf_sum = zeros.index_add(0, b, conf.to(_STAT))
    correct = zeros.index_add(0, b, (pred == labels).to(_STAT))
    return count, conf_sum, correct


def _ece_from_bins(count: Tensor, conf_sum: Tensor, correct: Tensor) -> float:
    return _ratio((correct - conf_sum).abs().sum(), count.sum())


def _mce_from_bins(count: Tensor, conf_sum: Tensor, correct: Tensor) -> float:
    filled = count > 0
    if not bool(filled.any()):
        return math.nan
    return float(((correct - conf_sum).abs()[filled] / count[filled]).max())


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top label (Guo et al. 2017):
    ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width confidence bins
    (right-closed, see the module docstring)."""
    return _ece_from_bins(*calibration_bins(probs, labels, n_bins, name="ece"))


def mce(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Maximum calibration error (Guo et al. 2017): ``max_b |acc(B_b) - conf(B_b)|`` over the
    non-empty bins of :func:`ece`."""
    return _mce_from_bins(*calibration_bins(probs, labels, n_bins, name="mce"))


def classwise_bins(probs: Tensor, labels: Tensor, n_bins: int = 15, *,
                   name: str = "classwise_bins") -> tuple[Tensor, Tensor, Tensor]:
    """Per-class, per-bin statistics of every class probability, float64 ``[C, n_bins]``:
    ``(count, sum of p_c, number of samples of class c)``. ``name``: the metric its errors name."""
    _at_least("classwise_bins", "n_bins", n_bins)
    _check_scores(name, probs, labels)
    probs = _real(probs)
    n_classes = probs.shape[1]
    flat = (_bin_index(probs, n_bins) + n_bins * torch.arange(n_classes, device=probs.device)).reshape(-1)
    onehot = F.one_hot(labels.long(), n_classes).to(_STAT).reshape(-1)
    zeros = torch.zeros(n_classes * n_bins, dtype=_STAT, device=probs.device)
    count = zeros.index_add(0, flat, torch.ones_like(onehot))
    prob_sum = zeros.index_add(0, flat, probs.to(_STAT).reshape(-1))
    label_sum = zeros.index_add(0, flat, onehot)
    shape = (n_classes, n_bins)
    return count.view(shape), prob_sum.view(shape), label_sum.view(shape)


def _classwise_from_bins(count: Tensor, prob_sum: Tensor, label_sum: Tensor) -> float:
    return _ratio((label_sum - prob_sum).abs().sum(), count.sum())  # count.sum() = N * C


def classwise_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): the mean over classes ``c`` of the binned calibration
    error of ``p_c`` against the indicator ``[y = c]``::

        1/C sum_c sum_b |B_cb|/N * |mean_{i in B_cb} [y_i = c] - mean_{i in B_cb} p_ic|

    with ``n_bins`` equal-width bins of the class-``c`` probability (right-closed, 0 in the
    first). The reference code of the paper bins with ``np.digitize(p, linspace(0, 1, n_bins))``,
    i.e. ``n_bins - 1`` left-closed bins plus one bin for ``p = 1``; here every class uses the
    same ``n_bins`` bins as :func:`ece`.
    """
    return _classwise_from_bins(*classwise_bins(probs, labels, n_bins, name="classwise_ece"))


# kNN and linear probe ---------------------------------------------------------------------------
def knn_predict(train_emb: Tensor, train_y: Tensor, test_emb: Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 512) -> Tensor:
    """Weighted kNN vote of InstDisc (Wu et al. 2018), returned as a tensor of class ids ``[M]``.

    Rows are L2-normalised; each test row takes its ``k`` most cosine-similar training rows
    ``s_1..s_k`` and predicts ``argmax_c sum_j exp(s_j / T) [y_j = c]`` (ties go to the smaller
    class id). Test rows are processed ``chunk_size`` at a time, so memory is
    ``O(chunk_size * N_train)``. ``k`` larger than the training set uses all of it.
    """
    name = "knn_accuracy"
    _at_least(name, "k", k)
    _positive(name, "temperature", temperature)
    _at_least(name, "chunk_size", chunk_size)
    _check_embeddings(name, train_emb, train_y, "train_emb")
    _check_embeddings(name, test_emb, None, "test_emb")
    if train_emb.shape[1] != test_emb.shape[1]:
        raise ShapeError(f"{name}: train_emb {list(train_emb.shape)} and test_emb "
                         f"{list(test_emb.shape)} differ in dimension")
    if train_emb.shape[0] == 0:
        raise ShapeError(f"{name}: train_emb is empty")
    _check_finite(name, "train_emb", train_emb)
    bank = F.normalize(_real(train_emb).detach(), dim=1)
    bank_y = train_y.to(bank.device).long()
    n_classes = int(bank_y.max()) + 1 if num_classes is None else num_classes
    kk = min(k, bank.shape[0])
    preds = []
    for start in range(0, test_emb.shape[0], chunk_size):
        q = F.normalize(_real(test_emb[start:start + chunk_size]).detach().to(bank), dim=1)
        sim, idx = (q @ bank.T).topk(kk, dim=1)
        weight = ((sim - sim[:, :1]) / temperature).exp()  # exp(s/T) up to a per-row factor
        votes = torch.zeros(q.shape[0], n_classes, dtype=weight.dtype, device=q.device)
        preds.append(votes.scatter_add_(1, bank_y[idx], weight).argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=bank.device)
    return torch.cat(preds)


def knn_accuracy(train_emb: Tensor, train_y: Tensor, test_emb: Tensor, test_y: Tensor,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 512) -> float:
    """Accuracy of the InstDisc weighted kNN vote (:func:`knn_predict`) on the test set."""
    _check_embeddings("knn_accuracy", test_emb, test_y, "test_emb")
    pred = knn_predict(train_emb, train_y, test_emb, k=k, temperature=temperature,
                       chunk_size=chunk_size)
    return _ratio((pred == test_y.to(pred.device)).sum() + _nan_if_any_nan(test_emb).to(pred.device),
                  torch.tensor(float(test_y.numel())))


class LinearProbeClassifier:
    """A fitted probe: ``logits = ((x - mean) / std) @ weight + bias``."""

    def __init__(self, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor):
        self.mean, self.std, self.weight, self.bias = mean, std, weight, bias

    def logits(self, x: Tensor) -> Tensor:
        x = _real(x).detach().to(self.weight)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(dim=1)


def fit_linear_probe(train_emb: Tensor, train_y: Tensor, weight_decay: float = 1e-4,
                     max_iter: int = 1000, num_classes: int | None = None) -> LinearProbeClassifier:
    """Multinomial logistic regression on standardised frozen embeddings, fitted with L-BFGS.

    Features are standardised with the training mean and standard deviation (constant features
    are left unscaled); weights and biases start at zero and minimise
    ``mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||_F^2`` (the bias is not penalised) with
    full-batch L-BFGS (strong-Wolfe line search, at most ``max_iter`` iterations), so the result is
    deterministic. This is scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))``.
    """
    name = "linear_probe"
    if not weight_decay >= 0:
        raise ConfigError(f"{name}: weight_decay must be >= 0, got {weight_decay}", param="weight_decay")
    _at_least(name, "max_iter", max_iter)
    _check_embeddings(name, train_emb, train_y, "train_emb")
    if train_emb.shape[0] == 0:
        raise ShapeError(f"{name}: train_emb is empty")
    _check_finite(name, "train_emb", train_emb)
    x = _real(train_emb).detach()
    y = train_y.to(x.device).long()
    n_classes = int(y.max()) + 1 if num_classes is None else num_classes
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbeClassifier(mean, std, weight.detach(), bias.detach())


def linear_probe_accuracy(train_emb: Tensor, train_y: Tensor, test_emb: Tensor, test_y: Tensor,
                          weight_decay: float = 1e-4, max_iter: int = 1000) -> float:
    """Test accuracy of :func:`fit_linear_probe` trained on the training embeddings."""
    _check_embeddings("linear_probe", test_emb, test_y, "test_emb")
    probe = fit_linear_probe(train_emb, train_y, weight_decay=weight_decay, max_iter=max_iter)
    pred = probe.predict(test_emb)
    return _ratio((pred == test_y.to(pred.device)).sum() + _nan_if_any_nan(test_emb).to(pred.device),
                  torch.tensor(float(test_y.numel())))


# alignment, uniformity, RankMe ------------------------------------------------------------------
def _alignment_stats(z1: Tensor, z2: Tensor, alpha: float) -> dict[str, Tensor]:
    _positive("alignment", "alpha", alpha)
    _check_embeddings("alignment", z1, None, "z1")
    if z2.shape != z1.shape:
        raise ShapeError(f"alignment: z1 {list(z1.shape)} and z2 {list(z2.shape)} must match")
    d = F.normalize(_real(z1), dim=1) - F.normalize(_real(z2), dim=1)
    return {"sum": d.norm(dim=1).pow(alpha).to(_STAT).sum(),
            "count": torch.tensor(float(z1.shape[0]), dtype=_STAT, device=z1.device)}


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """Alignment (Wang & Isola 2020): ``mean_i ||f(x_i) - f(x_i^+)||_2^alpha`` on L2-normalised
    positive pairs (rows of ``z1`` and ``z2``); lower is better."""
    s = _alignment_stats(z1, z2, alpha)
    return _ratio(s["sum"], s["count"])


def uniformity(z: Tensor, t: float = 2.0, chunk_size: int = 1024) -> float:
    """Uniformity (Wang & Isola 2020): ``log mean_{i<j} exp(-t ||f(x_i) - f(x_j)||_2^2)`` over all
    distinct pairs of L2-normalised rows; lower is better.

    Computed as a log-sum-exp, ``chunk_size`` rows at a time (memory ``O(chunk_size * N)``).
    """
    _positive("uniformity", "t", t)
    _at_least("uniformity", "chunk_size", chunk_size)
    _check_embeddings("uniformity", z)
    n = z.shape[0]
    if n < 2:
        raise ShapeError(f"uniformity: needs at least 2 rows, got {list(z.shape)}")
    u = F.normalize(_real(z), dim=1)
    col = torch.arange(n, device=u.device)
    parts = []
    for start in range(0, n, chunk_size):
        rows = u[start:start + chunk_size]
        sq = (2 - 2 * rows @ u.T).clamp_min(0)  # ||a - b||^2 of unit vectors
        later = col[None, :] > (start + torch.arange(rows.shape[0], device=u.device))[:, None]
        parts.append(torch.logsumexp((-t * sq).masked_fill(~later, -math.inf).flatten(), dim=0))
    n_pairs = n * (n - 1) / 2
    return float(torch.logsumexp(torch.stack(parts), dim=0)) - math.log(n_pairs)


def _rankme_from_singular_values(s: Tensor, eps: float) -> float:
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / ||s||_1 + eps``
    and ``s`` the ``min(N, D)`` singular values of the embedding matrix ``z [N, D]`` (not
    centred). Ranges from about 1 (collapse) to ``min(N, D)``."""
    if not eps >= 0:
        raise ConfigError(f"rankme: eps must be >= 0, got {eps}", param="eps")
    _check_embeddings("rankme", z)
    if z.numel() == 0:
        raise ShapeError(f"rankme: z is empty, got {list(z.shape)}")
    z = z.detach().to(_STAT)
    if not bool(torch.isfinite(z).all()):  # the SVD does not converge on NaN or inf
        return math.nan
    return _rankme_from_singular_values(torch.linalg.svdvals(z), eps)


# streaming metrics ------------------------------------------------------------------------------
def _probs_and_labels(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments of the prediction metrics for the conformance kit: probabilities
    ``[B, 3]`` peaked on the label (most rows) and the labels ``[B]``."""
    labels = torch.arange(batch_size) % 3
    logits = 2 * F.one_hot(labels, 3) + torch.randn(batch_size, 3, generator=generator)
    return logits.softmax(dim=1), labels


def _labelled_embeddings(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``fit`` and ``update`` arguments of the kNN and linear-probe metrics for the conformance
    kit: embeddings ``[B, 8]`` around one mean per class, and their labels ``i % 3``."""
    labels = torch.arange(batch_size) % 3
    means = 3 * torch.eye(3, 8)
    return means[labels] + torch.randn(batch_size, 8, generator=generator), labels


def _embeddings(batch_size: int, generator: torch.Generator) -> tuple[Tensor]:
    """``update`` argument of the embedding metrics for the conformance kit: ``z [B, 8]``."""
    return (torch.randn(batch_size, 8, generator=generator),)


class _Sums(Metric):
    """Adds float64 statistics on the device of the first update; ``state_dict`` carries them."""

    def __init__(self) -> None:
        self._stats: dict[str, Tensor] = {}

    def _add(self, stats: Mapping[str, Tensor]) -> None:
        for key, value in stats.items():
            current = self._stats.get(key)
            if current is not None and current.shape != value.shape:
                raise ShapeError(f"{type(self).__name__}: statistic {key!r} of shape "
                                 f"{list(value.shape)} cannot join the accumulated "
                                 f"{list(current.shape)} (the number of classes changed?)")
            value = value.detach()
            self._stats[key] = value.clone() if current is None else current + value.to(current.device)

    def _get(self, *keys: str) -> tuple[Tensor, ...] | None:
        """The accumulated statistics, summed over the ranks under ``torch.distributed`` (so
        ``compute`` is then a collective: every rank must call it, each having updated)."""
        if not self._stats:
            return None
        from sdk.distributed import sum_over_ranks

        return tuple(sum_over_ranks(self._stats[k]) for k in keys)

    def reset(self) -> None:
        self._stats = {}

    def state_dict(self) -> dict[str, Any]:
        return {key: value.clone() for key, value in self._stats.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._stats = {key: torch.as_tensor(value).clone() for key, value in state.items()}


class _Mean(_Sums):
    """A streaming mean: the ratio of the two accumulated statistics named by ``ratio_of``."""

    ratio_of: tuple[str, str] = ("sum", "count")

    def compute(self) -> float:
        s = self._get(*self.ratio_of)
        return math.nan if s is None else _ratio(*s)


class Accuracy(_Mean):
    """Streaming :func:`accuracy`: ``update(logits_or_probs, labels)`` counts correct rows."""

    example_inputs = staticmethod(_probs_and_labels)

    ratio_of = ("correct", "total")

    def update(self, logits_or_probs: Tensor, labels: Tensor) -> None:
        self._add(_accuracy_stats(logits_or_probs, labels))


class NLL(_Mean):
    """Streaming :func:`nll`: ``update(probs, labels)`` sums ``-log p_y``."""

    example_inputs = staticmethod(_probs_and_labels)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self._add(_nll_stats(probs, labels))


class Brier(_Mean):
    """Streaming :func:`brier`: ``update(probs, labels)`` sums ``sum_c (p_c - y_c)^2``."""

    example_inputs = staticmethod(_probs_and_labels)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self._add(_brier_stats(probs, labels))


class _Binned(_Sums):
    def __init__(self, n_bins: int = 15):
        super().__init__()
        _at_least(type(self).__name__, "n_bins", n_bins)
        self.n_bins = n_bins


class ECE(_Binned):
    """Streaming :func:`ece`: per-bin counts, confidence sums and correct counts (``[n_bins]``)."""

    example_inputs = staticmethod(_probs_and_labels)

    name = "ece"

    def update(self, probs: Tensor, labels: Tensor) -> None:
        count, conf, correct = calibration_bins(probs, labels, self.n_bins, name=self.name)
        self._add({"count": count, "confidence": conf, "correct": correct})

    def bins(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Accumulated ``(count, sum of confidences, number correct)``, or None before any update."""
        return self._get("count", "confidence", "correct")

    def compute(self) -> float:
        s = self.bins()
        return math.nan if s is None else _ece_from_bins(*s)


class MCE(ECE):
    """Streaming :func:`mce` from the same per-bin statistics as :class:`ECE`."""

    name = "mce"

    def compute(self) -> float:
        s = self.bins()
        return math.nan if s is None else _mce_from_bins(*s)


class ClasswiseECE(_Binned):
    """Streaming :func:`classwise_ece`: per-class, per-bin sums (``[C, n_bins]``)."""

    example_inputs = staticmethod(_probs_and_labels)

    name = "classwise_ece"

    def update(self, probs: Tensor, labels: Tensor) -> None:
        count, prob_sum, label_sum = classwise_bins(probs, labels, self.n_bins, name=self.name)
        self._add({"count": count, "prob_sum": prob_sum, "label_sum": label_sum})

    def compute(self) -> float:
        s = self._get("count", "prob_sum", "label_sum")
        return math.nan if s is None else _classwise_from_bins(*s)


class Alignment(_Mean):
    """Streaming :func:`alignment`: ``update(z1, z2)`` sums ``||f(x) - f(x+)||^alpha``."""

    def __init__(self, alpha: float = 2.0):
        super().__init__()
        _positive("alignment", "alpha", alpha)
        self.alpha = alpha

    def update(self, z1: Tensor, z2: Tensor) -> None:
        self._add(_alignment_stats(z1, z2, self.alpha))

    @staticmethod
    def example_inputs(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two views ``[B, 8]`` of each sample, for the conformance kit."""
        (z,) = _embeddings(batch_size, generator)
        return z, z + 0.1 * torch.randn(z.shape, generator=generator)


class RankMe(_Sums):
    """Streaming :func:`rankme`: accumulates the Gram matrix ``Z^T Z`` (``[D, D]``, float64), whose
    eigenvalues are the squared singular values of ``Z``, so memory does not grow with ``N``."""

    example_inputs = staticmethod(_embeddings)

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        if not eps >= 0:
            raise ConfigError(f"rankme: eps must be >= 0, got {eps}", param="eps")
        self.eps = eps

    def update(self, z: Tensor) -> None:
        _check_embeddings("rankme", z)
        z = z.detach().to(_STAT)
        self._add({"gram": z.T @ z, "count": torch.tensor(float(z.shape[0]), dtype=_STAT,
                                                          device=z.device)})

    def compute(self) -> float:
        s = self._get("gram", "count")
        if s is None:
            return math.nan
        gram, count = s
        if int(count) == 0:  # only empty batches were seen: nothing measured
            return math.nan
        if not bool(torch.isfinite(gram).all()):  # NaN or inf seen: no eigenvalues to measure
            return math.nan
        r = min(int(count), gram.shape[0])
        eig = torch.linalg.eigvalsh(gram).flip(0)[:r]  # the r largest, descending
        return _rankme_from_singular_values(eig.clamp_min(0).sqrt(), self.eps)


class _Stored(Metric):
    """Keeps what it is given; for metrics that need every row at once."""

    def __init__(self) -> None:
        self._rows: list[Tensor] = []

    def reset(self) -> None:
        self._rows = []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": torch.cat(self._rows)} if self._rows else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rows = [torch.as_tensor(state["rows"]).clone()] if "rows" in state else []


class Uniformity(_Stored):
    """:func:`uniformity` over every row passed to ``update(z)``; it needs all pairs, so it keeps
    the L2-normalised rows (memory ``O(N * D)``)."""

    example_inputs = staticmethod(_embeddings)

    def __init__(self, t: float = 2.0, chunk_size: int = 1024):
        super().__init__()
        _positive("uniformity", "t", t)
        _at_least("uniformity", "chunk_size", chunk_size)
        self.t, self.chunk_size = t, chunk_size

    def update(self, z: Tensor) -> None:
        _check_embeddings("uniformity", z)
        self._rows.append(F.normalize(_real(z).detach(), dim=1))

    def compute(self) -> float:
        if sum(r.shape[0] for r in self._rows) < 2:
            return math.nan
        device = self._rows[0].device
        return uniformity(torch.cat([r.to(device) for r in self._rows]), t=self.t,
                          chunk_size=self.chunk_size)


class KNNAccuracy(_Mean):
    """Streaming :func:`knn_accuracy`: ``fit(train_emb, train_y)`` sets the neighbour bank,
    ``update(test_emb, test_y)`` counts correct votes batch by batch."""

    ratio_of = ("correct", "total")
    example_inputs = staticmethod(_labelled_embeddings)

    def __init__(self, k: int = 20, temperature: float = 0.07, chunk_size: int = 512):
        super().__init__()
        _at_least("knn_accuracy", "k", k)
        _positive("knn_accuracy", "temperature", temperature)
        _at_least("knn_accuracy", "chunk_size", chunk_size)
        self.k, self.temperature, self.chunk_size = k, temperature, chunk_size
        self._bank: tuple[Tensor, Tensor] | None = None

    def fit(self, train_emb: Tensor, train_y: Tensor) -> KNNAccuracy:
        _check_embeddings("knn_accuracy", train_emb, train_y, "train_emb")
        if train_emb.shape[0] == 0:
            raise ShapeError("knn_accuracy: train_emb is empty")
        _check_finite("knn_accuracy", "train_emb", train_emb)
        self._bank = (F.normalize(_real(train_emb).detach(), dim=1), train_y.detach().long())
        super().reset()
        return self

    def update(self, test_emb: Tensor, test_y: Tensor) -> None:
        if self._bank is None:
            raise NotFittedError("knn_accuracy: call fit(train_emb, train_y) before update()")
        _check_embeddings("knn_accuracy", test_emb, test_y, "test_emb")
        bank, bank_y = self._bank
        pred = knn_predict(bank, bank_y, test_emb, k=self.k, temperature=self.temperature,
                           chunk_size=self.chunk_size)
        self._add({"correct": (pred == test_y.to(pred.device)).to(_STAT).sum() + _nan_if_any_nan(test_emb),
                   "total": torch.tensor(float(test_y.numel()), dtype=_STAT, device=pred.device)})

    def reset(self) -> None:
        super().reset()
        self._bank = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._bank is not None:
            state["bank"], state["bank_labels"] = (t.clone() for t in self._bank)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        bank, labels = state.pop("bank", None), state.pop("bank_labels", None)
        super().load_state_dict(state)
        self._bank = None if bank is None else (torch.as_tensor(bank).clone(),
                                                torch.as_tensor(labels).clone())


class LinearProbe(_Mean):
    """Streaming :func:`linear_probe_accuracy`: ``fit(train_emb, train_y)`` trains the probe,
    ``update(test_emb, test_y)`` counts its correct predictions batch by batch."""

    ratio_of = ("correct", "total")
    example_inputs = staticmethod(_labelled_embeddings)

    _PARAMS = ("mean", "std", "weight", "bias")

    def __init__(self, weight_decay: float = 1e-4, max_iter: int = 1000):
        super().__init__()
        if not weight_decay >= 0:
            raise ConfigError(f"linear_probe: weight_decay must be >= 0, got {weight_decay}",
                              param="weight_decay")
        _at_least("linear_probe", "max_iter", max_iter)
        self.weight_decay, self.max_iter = weight_decay, max_iter
        self.probe: LinearProbeClassifier | None = None

    def fit(self, train_emb: Tensor, train_y: Tensor) -> LinearProbe:
        self.probe = fit_linear_probe(train_emb, train_y, weight_decay=self.weight_decay,
                                      max_iter=self.max_iter)
        super().reset()
        return self

    def update(self, test_emb: Tensor, test_y: Tensor) -> None:
        if self.probe is None:
            raise NotFittedError("linear_probe: call fit(train_emb, train_y) before update()")
        _check_embeddings("linear_probe", test_emb, test_y, "test_emb")
        if test_emb.shape[1] != self.probe.weight.shape[0]:
            raise ShapeError(f"linear_probe: test_emb {list(test_emb.shape)} differs in dimension "
                             f"from the train_emb the probe was fitted on ({self.probe.weight.shape[0]})")
        pred = self.probe.predict(test_emb)
        self._add({"correct": (pred == test_y.to(pred.device)).to(_STAT).sum() + _nan_if_any_nan(test_emb),
                   "total": torch.tensor(float(test_y.numel()), dtype=_STAT, device=pred.device)})

    def reset(self) -> None:
        super().reset()
        self.probe = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.probe is not None:
            state.update({f"probe_{k}": getattr(self.probe, k).clone() for k in self._PARAMS})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        probe = {k: state.pop(f"probe_{k}") for k in self._PARAMS if f"probe_{k}" in state}
        super().load_state_dict(state)
        self.probe = (LinearProbeClassifier(**{k: torch.as_tensor(v).clone() for k, v in probe.items()})
                      if len(probe) == len(self._PARAMS) else None)


# out-of-distribution detection ------------------------------------------------------------------
# Scores are anomaly scores (higher = more anomalous, the convention of sdk.ood); ``is_ood`` is
# 1 for out-of-distribution rows, 0 for in-distribution ones. Ties are grouped into one
# threshold, as scikit-learn's roc_curve / precision_recall_curve do.
__all__ += ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "AUROC", "AUPRIn", "AUPROut", "FPRAtTPR"]


def _check_ood(name: str, scores: Tensor, is_ood: Tensor) -> None:
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ShapeError(f"{name}: scores must be floating anomaly scores [N], got {scores.dtype} "
                         f"{list(scores.shape)}")
    if is_ood.shape != scores.shape or is_ood.is_floating_point():
        raise ShapeError(f"{name}: is_ood must be integer or bool 0/1 flags [{scores.shape[0]}], got "
                         f"{is_ood.dtype} {list(is_ood.shape)}")
    if is_ood.numel() and bool(((is_ood != 0) & (is_ood != 1)).any()):
        raise ShapeError(f"{name}: is_ood must hold 0 (in-distribution) or 1 (out-of-distribution), "
                         f"got values in [{int(is_ood.min())}, {int(is_ood.max())}]")


def _tie_grouped_counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative true and false positives (float64) when flagging every row scoring at least
    each distinct threshold, thresholds from the highest score down."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, p = scores[order], positive[order].to(_STAT)
    tp, fp = p.cumsum(0), (1 - p).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return tp[last], fp[last]


def _undefined(scores: Tensor, is_ood: Tensor) -> bool:
    """NaN scores, or a single class: the OOD metrics are not defined."""
    n_out = is_ood.long().sum()
    return bool(scores.isnan().any() | (n_out == 0) | (n_out == is_ood.numel()))


def auroc(scores: Tensor, is_ood: Tensor) -> float:
    """Area under the ROC curve of out-of-distribution rows against in-distribution ones
    (trapezoids between distinct thresholds: a tie counts one half), as scikit-learn's
    ``roc_auc_score(is_ood, scores)``."""
    _check_ood("auroc", scores, is_ood)
    if _undefined(scores, is_ood):
        return math.nan
    tp, fp = _tie_grouped_counts(_real(scores), is_ood)
    tpr, fpr = F.pad(tp / tp[-1], (1, 0)), F.pad(fp / fp[-1], (1, 0))
    return float(torch.trapezoid(tpr, fpr))


def _average_precision(scores: Tensor, positive: Tensor) -> float:
    tp, fp = _tie_grouped_counts(scores, positive)
    precision, recall = tp / (tp + fp), F.pad(tp / tp[-1], (1, 0))
    return float(((recall[1:] - recall[:-1]) * precision).sum())


def aupr_in(scores: Tensor, is_ood: Tensor) -> float:
    """Area under the precision-recall curve with in-distribution rows positive and ranked by
    ``-scores`` (average precision, no interpolation): scikit-learn's
    ``average_precision_score(1 - is_ood, -scores)``."""
    _check_ood("aupr_in", scores, is_ood)
    if _undefined(scores, is_ood):
        return math.nan
    return _average_precision(-_real(scores), 1 - is_ood.long())


def aupr_out(scores: Tensor, is_ood: Tensor) -> float:
    """Average precision with out-of-distribution rows positive, ranked by ``scores``:
    scikit-learn's ``average_precision_score(is_ood, scores)``."""
    _check_ood("aupr_out", scores, is_ood)
    if _undefined(scores, is_ood):
        return math.nan
    return _average_precision(_real(scores), is_ood.long())


def fpr_at_tpr(scores: Tensor, is_ood: Tensor, tpr: float = 0.95) -> float:
    """The fraction of out-of-distribution rows accepted as in-distribution at the lowest
    threshold that accepts at least ``tpr`` of the in-distribution rows (in-distribution is the
    positive class, ranked by ``-scores``; Liang et al. 2018): scikit-learn's
    ``fpr[searchsorted(tpr_curve, tpr)]`` of ``roc_curve(1 - is_ood, -scores)``."""
    _check_ood("fpr_at_tpr", scores, is_ood)
    if not 0 < tpr <= 1:
        raise ConfigError(f"fpr_at_tpr: tpr must lie in (0, 1], got {tpr}", param="tpr")
    if _undefined(scores, is_ood):
        return math.nan
    tp, fp = _tie_grouped_counts(-_real(scores), 1 - is_ood.long())
    reached = torch.searchsorted(tp / tp[-1], torch.tensor([tpr], dtype=_STAT, device=tp.device))
    return float((fp / fp[-1])[reached.clamp_max(tp.shape[0] - 1)])


def _ood_scores(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments of the OOD metrics for the conformance kit: anomaly scores ``[B]``,
    one higher on average for the out-of-distribution rows (``is_ood = i % 2``)."""
    is_ood = torch.arange(batch_size) % 2
    return torch.randn(batch_size, generator=generator) + is_ood, is_ood


class _Ranked(Metric):
    """Keeps every ``(scores, is_ood)`` pair (ranking metrics have no fixed-size sufficient
    statistic); ``compute`` applies the one-shot function to their concatenation."""

    example_inputs = staticmethod(_ood_scores)
    name = ""
    measure = staticmethod(auroc)  # the one-shot function, set by each subclass

    def __init__(self) -> None:
        self._scores: list[Tensor] = []
        self._flags: list[Tensor] = []

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        _check_ood(self.name, scores, is_ood)
        self._scores.append(scores.detach())
        self._flags.append(is_ood.detach().to(scores.device))

    def _all(self) -> tuple[Tensor, Tensor] | None:
        if not self._scores:
            return None
        return torch.cat([_real(s) for s in self._scores]), torch.cat(self._flags)

    def compute(self) -> float:
        both = self._all()
        return math.nan if both is None else self.measure(*both)

    def reset(self) -> None:
        self._scores, self._flags = [], []

    def state_dict(self) -> dict[str, Any]:
        both = self._all()
        return {} if both is None else {"scores": both[0].clone(), "is_ood": both[1].clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        if "scores" in state:
            self._scores = [torch.as_tensor(state["scores"]).clone()]
            self._flags = [torch.as_tensor(state["is_ood"]).clone()]


class AUROC(_Ranked):
    """Streaming :func:`auroc`."""

    name = "auroc"
    measure = staticmethod(auroc)


class AUPRIn(_Ranked):
    """Streaming :func:`aupr_in`."""

    name = "aupr_in"
    measure = staticmethod(aupr_in)


class AUPROut(_Ranked):
    """Streaming :func:`aupr_out`."""

    name = "aupr_out"
    measure = staticmethod(aupr_out)


class FPRAtTPR(_Ranked):
    """Streaming :func:`fpr_at_tpr` (``tpr = 0.95``: FPR95)."""

    name = "fpr_at_tpr"

    def __init__(self, tpr: Annotated[float, Interval(gt=0, le=1)] = 0.95) -> None:
        super().__init__()
        self.tpr = tpr

    def compute(self) -> float:
        both = self._all()
        return math.nan if both is None else fpr_at_tpr(*both, self.tpr)


# equal-mass ECE, risk-coverage, prediction sets --------------------------------------------------
FINE_BINS = 10_000
"""Equal-width confidence bins the streaming equal-mass ECE and AURC accumulate (``O(FINE_BINS)``
state): the resolution at which they order confidences."""


def _equal_mass_edges(total: Tensor, n_bins: int) -> Tensor:
    """Interior rank boundaries ``[n_bins - 1]`` of ``numpy.array_split`` of ``total`` sorted
    samples into ``n_bins`` (the first ``total mod n_bins`` bins one sample larger)."""
    k = torch.arange(1, n_bins, dtype=_STAT, device=total.device)
    base, extra = torch.div(total, n_bins, rounding_mode="floor"), torch.remainder(total, n_bins)
    return k * base + torch.minimum(k, extra)


def _adaptive_from_fine(count: Tensor, conf_sum: Tensor, correct: Tensor, n_bins: int
                        ) -> tuple[float, float]:
    """``(equal-mass ECE, bound)`` from fine-bin sums. Each fine bin joins the equal-mass bin of
    its middle rank; only samples of a fine bin that an equal-mass boundary cuts can sit in
    another bin than the exact sorted split puts them in, and moving one changes
    ``N * ECE = sum_b |sum_{i in b} (correct_i - conf_i)|`` by at most 2, so
    ``|approx - exact| <= 2 * (samples in cut fine bins) / N`` (the returned bound)."""
    total = count.sum()
    if not bool(total > 0):
        return math.nan, math.nan
    after = count.cumsum(0)
    before = after - count
    edges = _equal_mass_edges(total, n_bins)
    k = torch.searchsorted(edges, (before + after) / 2, right=True)
    gap = torch.zeros(n_bins, dtype=_STAT, device=count.device).index_add(0, k, correct - conf_sum)
    cut = ((edges[None, :] > before[:, None]) & (edges[None, :] < after[:, None])).any(1)
    return float(gap.abs().sum() / total), float(2 * count[cut].sum() / total)


def adaptive_ece(probs: Tensor, labels: Tensor, n_bins: int = 15, fine_bins: int = FINE_BINS) -> float:
    """Equal-mass (adaptive) ECE (Nixon et al. 2019; AdaECE of Mukhoti et al. 2020): top-label
    confidences sorted and split into ``n_bins`` bins of equal count (``numpy.array_split``),
    ``sum_b |B_b|/N |acc(B_b) - conf(B_b)|``; computed from ``fine_bins`` equal-width bins,
    exact up to the bound of :class:`AdaptiveECE`."""
    _at_least("adaptive_ece", "n_bins", n_bins)
    return _adaptive_from_fine(*calibration_bins(probs, labels, fine_bins, name="adaptive_ece"), n_bins)[0]


def _harmonic(n: Tensor) -> Tensor:
    """``H(n) = sum_{k=1}^n 1/k`` for real ``n >= 0`` (digamma(n + 1) + Euler's gamma)."""
    return torch.special.digamma(n + 1) + 0.5772156649015329


def _aurc_from_fine(count: Tensor, errors: Tensor) -> tuple[float, float]:
    """``(AURC, bound)`` from per-fine-bin counts and errors. Samples are taken in decreasing
    confidence, those of one fine bin in random order: with ``a`` samples before a bin of
    ``c`` holding ``e`` errors, ``E_a`` errors before it, its terms sum in expectation to
    ``E_a (H(a+c) - H(a)) + e/c (c - a (H(a+c) - H(a)))``. Any order within the bin moves each
    ``E_k`` by at most ``min(e, c - e)``, so ``|approx - exact| <= 1/N sum_bins min(e, c - e)
    (H(a+c) - H(a))``."""
    count, errors = count.flip(0), errors.flip(0)  # decreasing confidence
    total = count.sum()
    if not bool(total > 0):
        return math.nan, math.nan
    a = count.cumsum(0) - count
    e_before = errors.cumsum(0) - errors
    dh = _harmonic(a + count) - _harmonic(a)
    share = torch.where(count > 0, errors / count.clamp_min(1), 0.0)
    value = (e_before * dh + share * (count - a * dh)).sum() / total
    bound = (torch.minimum(errors, count - errors) * dh).sum() / total
    return float(value), float(bound)


def _aurc_stats(probs: Tensor, labels: Tensor, fine_bins: int) -> dict[str, Tensor]:
    count, _, correct = calibration_bins(probs, labels, fine_bins, name="aurc")
    return {"count": count, "errors": count - correct + _nan_if_any_nan(probs)}


def aurc(probs: Tensor, labels: Tensor, fine_bins: int = FINE_BINS) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): rows by decreasing top-label
    confidence, ``1/N sum_k risk(k)``, ``risk(k)`` the error rate of the ``k`` most confident;
    ties (rows of one of ``fine_bins`` confidence bins) in random order (the expectation)."""
    _at_least("aurc", "fine_bins", fine_bins)
    s = _aurc_stats(probs, labels, fine_bins)
    return _aurc_from_fine(s["count"], s["errors"])[0]


def _check_sets(name: str, sets: Tensor, labels: Tensor) -> None:
    """``sets`` ``[N, C]``: boolean, or numbers that are all 0 or 1 (NaN passes, to be measured
    as NaN)."""
    if sets.dim() != 2:
        raise ShapeError(f"{name}: sets must be a membership mask [N, C], got {sets.dtype} "
                         f"{list(sets.shape)}")
    if sets.dtype != torch.bool:
        bad = (sets != 0) & (sets != 1)
        if sets.is_floating_point():
            bad &= ~sets.isnan()
        if bool(bad.any()):
            raise ShapeError(f"{name}: sets must hold only 0 and 1 (a membership mask), got "
                             f"{sets[bad][0].item()!r} in {sets.dtype} {list(sets.shape)}")
    _check_scores(name, sets, labels)


def _set_stats(name: str, sets: Tensor, labels: Tensor) -> dict[str, Tensor]:
    _check_sets(name, sets, labels)
    flags = sets.to(_STAT)
    poison = _nan_if_any_nan(flags)  # a NaN anywhere in the mask is measured as NaN
    covered = flags.gather(1, labels.long()[:, None]).sum()
    return {"covered": covered + poison, "size": flags.sum() + poison,
            "count": torch.tensor(float(labels.numel()), dtype=_STAT, device=labels.device)}


def _sets_and_labels(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``update`` arguments of the set metrics for the conformance kit: the sets ``p > 0.2`` of
    :func:`_probs_and_labels` as a 0/1 float mask ``[B, 3]``, and the labels."""
    probs, labels = _probs_and_labels(batch_size, generator)
    return (probs > 0.2).float(), labels


def set_coverage(sets: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose prediction set holds the label: ``mean_i [y_i in C(x_i)]``."""
    s = _set_stats("set_coverage", sets, labels)
    return _ratio(s["covered"], s["count"])


def set_size(sets: Tensor, labels: Tensor) -> float:
    """Mean number of classes in a prediction set: ``mean_i |C(x_i)|`` (``labels`` are checked
    only, so the metric streams beside :func:`set_coverage`)."""
    s = _set_stats("set_size", sets, labels)
    return _ratio(s["size"], s["count"])


class AdaptiveECE(_Binned):
    """Streaming :func:`adaptive_ece`: fine-bin sums ``[fine_bins]`` (count, confidence,
    correct), merged into ``n_bins`` equal-mass bins at ``compute``; :meth:`error_bound` is the
    largest possible distance to the exact equal-mass ECE of the rows seen."""

    example_inputs = staticmethod(_probs_and_labels)

    name = "adaptive_ece"

    def __init__(self, n_bins: int = 15, fine_bins: int = FINE_BINS):
        super().__init__(n_bins)
        _at_least("adaptive_ece", "fine_bins", fine_bins)
        self.fine_bins = fine_bins

    def update(self, probs: Tensor, labels: Tensor) -> None:
        count, conf, correct = calibration_bins(probs, labels, self.fine_bins, name=self.name)
        self._add({"count": count, "confidence": conf, "correct": correct})

    def _both(self) -> tuple[float, float]:
        s = self._get("count", "confidence", "correct")
        return (math.nan, math.nan) if s is None else _adaptive_from_fine(*s, self.n_bins)

    def compute(self) -> float:
        return self._both()[0]

    def error_bound(self) -> float:
        """``2 * (rows in fine bins an equal-mass boundary cuts) / N``."""
        return self._both()[1]


class AURC(_Sums):
    """Streaming :func:`aurc`: per fine confidence bin, rows and errors (``[fine_bins]``);
    :meth:`error_bound` bounds the distance to the exact AURC of any order of tied rows."""

    example_inputs = staticmethod(_probs_and_labels)

    def __init__(self, fine_bins: int = FINE_BINS):
        super().__init__()
        _at_least("aurc", "fine_bins", fine_bins)
        self.fine_bins = fine_bins

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self._add(_aurc_stats(probs, labels, self.fine_bins))

    def _both(self) -> tuple[float, float]:
        s = self._get("count", "errors")
        return (math.nan, math.nan) if s is None else _aurc_from_fine(*s)

    def compute(self) -> float:
        return self._both()[0]

    def error_bound(self) -> float:
        return self._both()[1]


class SetCoverage(_Mean):
    """Streaming :func:`set_coverage`: ``update(sets, labels)``, sets a boolean or 0/1 ``[N, C]``."""

    ratio_of = ("covered", "count")
    example_inputs = staticmethod(_sets_and_labels)

    def update(self, sets: Tensor, labels: Tensor) -> None:
        self._add(_set_stats("set_coverage", sets, labels))


class SetSize(_Mean):
    """Streaming :func:`set_size`: ``update(sets, labels)`` sums the set sizes."""

    ratio_of = ("size", "count")
    example_inputs = staticmethod(_sets_and_labels)

    def update(self, sets: Tensor, labels: Tensor) -> None:
        self._add(_set_stats("set_size", sets, labels))


# checks shared with the metric plugins of other families ----------------------------------------
__all__ += ["check_embeddings", "check_finite", "nan_if_any_nan"]


def check_embeddings(name: str, z: Tensor, labels: Tensor | None = None, what: str = "z") -> None:
    """Raise :class:`~sdk.errors.ShapeError` naming ``name`` unless ``z`` is ``[N, D]`` and
    ``labels`` (when given) ``[N]`` integer class ids ``>= 0``."""
    _check_embeddings(name, z, labels, what)


def check_finite(name: str, what: str, z: Tensor) -> None:
    """Raise :class:`~sdk.errors.ShapeError` naming ``name`` and ``what`` if ``z`` holds NaN or
    inf (a host sync: for rows a metric fits on, once per fit)."""
    _check_finite(name, what, z)


def nan_if_any_nan(x: Tensor) -> Tensor:
    """A float64 0, or NaN when ``x`` holds a NaN (no host sync): add it to a statistic."""
    return _nan_if_any_nan(x)
