"""A generative probe beside the discriminative one: Gaussian naive Bayes on frozen features.

Zheng, Wu, Bao, Cao, Li, Zhu, "Revisiting Discriminative vs. Generative Classifiers: Theory and
Implications", ICML 2023 (arXiv:2302.02334): multiclass naive Bayes approaches its asymptotic
error with O(log n) samples, logistic regression with O(n) (n = feature dimension). The naive
Bayes of the authors' code: class means, a diagonal covariance shared by the classes (the
prior-weighted mean of the per-class variances) and the class frequencies as priors.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import Tensor

from sdk.card import Card
from sdk.distributed import sum_over_ranks
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import (
    LinearProbeClassifier,
    check_embeddings,
    check_finite,
    fit_linear_probe,
    nan_if_any_nan,
)

_NAME = "naive_bayes_probe"
_STAT = torch.float64


class NaiveBayesClassifier:
    """A fitted naive Bayes: ``log p(y = c, x) = log pi_c - 1/2 sum_d (x_d - mu_cd)^2 / s2_d``
    up to a constant shared by the classes (``means [C, D]``, ``var [D]``, ``log_prior [C]``;
    a class absent from the training rows has ``log pi_c = -inf`` and is never predicted)."""

    def __init__(self, means: Tensor, var: Tensor, log_prior: Tensor):
        self.means, self.var, self.log_prior = means, var, log_prior

    def log_joint(self, x: Tensor) -> Tensor:
        x = x.detach().to(self.means)
        sq = ((x.pow(2) / self.var).sum(1, keepdim=True) - 2 * (x / self.var) @ self.means.T
              + (self.means.pow(2) / self.var).sum(1))
        return self.log_prior - 0.5 * sq

    def predict(self, x: Tensor) -> Tensor:
        return self.log_joint(x).argmax(dim=1)


def fit_naive_bayes(train_emb: Tensor, train_y: Tensor, var_epsilon: float = 1e-9,
                    num_classes: int | None = None) -> NaiveBayesClassifier:
    """``mu_c = mean_{y_i = c} x_i``; ``v_c = mean_{y_i = c} (x_i - mu_c)^2 + var_epsilon``;
    ``s2 = sum_c pi_c v_c`` with ``pi_c = n_c / N`` (float64)."""
    check_embeddings(_NAME, train_emb, train_y, "train_emb")
    if train_emb.shape[0] == 0 or not train_emb.is_floating_point():
        raise ShapeError(f"{_NAME}: train_emb must be non-empty floating [N, D], got "
                         f"{train_emb.dtype} {list(train_emb.shape)}")
    check_finite(_NAME, "train_emb", train_emb)
    x = train_emb.detach().to(_STAT)
    y = train_y.to(x.device).long()
    n_classes = int(y.max()) + 1 if num_classes is None else num_classes
    onehot = F.one_hot(y, n_classes).to(x)                    # [N, C]
    counts = onehot.sum(0)
    means = (onehot.T @ x) / counts.clamp_min(1)[:, None]
    var = (x - means[y]).pow(2).mean(0) + var_epsilon        # = sum_c pi_c v_c
    return NaiveBayesClassifier(means, var, (counts / x.shape[0]).log())


def _labelled(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``fit`` / ``update`` arguments for the conformance kit: ``[B, 8]`` around one mean per
    class and the labels ``i % 3``."""
    labels = torch.arange(batch_size) % 3
    return 3 * torch.eye(3, 8)[labels] + torch.randn(batch_size, 8, generator=generator), labels


class NaiveBayesProbe(Metric):
    """``fit(train_emb, train_y)`` fits the naive Bayes (and, with ``logistic``, the logistic
    probe of :func:`sdk.metrics.fit_linear_probe` on the same rows); ``update(test_emb, test_y)``
    counts correct predictions; ``compute()`` gives the test accuracies ``naive_bayes`` (and
    ``logistic``)."""

    example_inputs = staticmethod(_labelled)

    def __init__(self, var_epsilon: Annotated[float, Ge(0)] = 1e-9, logistic: bool = True,
                 weight_decay: Annotated[float, Ge(0)] = 1e-4, max_iter: Annotated[int, Ge(1)] = 1000):
        self.var_epsilon, self.logistic = var_epsilon, logistic
        self.weight_decay, self.max_iter = weight_decay, max_iter
        self.nb: NaiveBayesClassifier | None = None
        self.lr: LinearProbeClassifier | None = None
        self._stats: dict[str, Tensor] = {}

    def fit(self, train_emb: Tensor, train_y: Tensor) -> NaiveBayesProbe:
        self.nb = fit_naive_bayes(train_emb, train_y, self.var_epsilon)
        self.lr = (fit_linear_probe(train_emb, train_y, self.weight_decay, self.max_iter,
                                    num_classes=self.nb.means.shape[0]) if self.logistic else None)
        self._stats = {}
        return self

    def update(self, test_emb: Tensor, test_y: Tensor) -> None:
        if self.nb is None:
            raise NotFittedError(f"{_NAME}: call fit(train_emb, train_y) before update()")
        check_embeddings(_NAME, test_emb, test_y, "test_emb")
        if test_emb.shape[1] != self.nb.means.shape[1] or not test_emb.is_floating_point():
            raise ShapeError(f"{_NAME}: test_emb must be floating [N, {self.nb.means.shape[1]}] like "
                             f"train_emb, got {test_emb.dtype} {list(test_emb.shape)}")
        y = test_y.to(self.nb.means.device)
        nan = nan_if_any_nan(test_emb).to(y.device)
        stats = {"naive_bayes": (self.nb.predict(test_emb) == y).to(_STAT).sum() + nan,
                 "count": torch.tensor(float(y.numel()), dtype=_STAT, device=y.device)}
        if self.lr is not None:
            stats["logistic"] = (self.lr.predict(test_emb).to(y.device) == y).to(_STAT).sum() + nan
        for key, value in stats.items():
            self._stats[key] = self._stats[key] + value if key in self._stats else value

    def compute(self) -> dict[str, float]:
        keys = ("naive_bayes", "logistic") if self.logistic else ("naive_bayes",)
        if not self._stats:
            return dict.fromkeys(keys, math.nan)
        count = float(sum_over_ranks(self._stats["count"]))
        return {k: float(sum_over_ranks(self._stats[k])) / count if count > 0 else math.nan
                for k in keys}

    def reset(self) -> None:
        self.nb, self.lr, self._stats = None, None, {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"stat_{k}": v.clone() for k, v in self._stats.items()}
        if self.nb is not None:
            state.update(nb_means=self.nb.means, nb_var=self.nb.var, nb_log_prior=self.nb.log_prior)
        if self.lr is not None:
            state.update({f"lr_{k}": getattr(self.lr, k) for k in ("mean", "std", "weight", "bias")})
        return {k: v.clone() for k, v in state.items()}

    def load_state_dict(self, state: Any) -> None:
        state = {k: torch.as_tensor(v).clone() for k, v in state.items()}
        self._stats = {k[5:]: v for k, v in state.items() if k.startswith("stat_")}
        self.nb = (NaiveBayesClassifier(state["nb_means"], state["nb_var"], state["nb_log_prior"])
                   if "nb_means" in state else None)
        self.lr = (LinearProbeClassifier(*(state[f"lr_{k}"] for k in ("mean", "std", "weight", "bias")))
                   if "lr_mean" in state else None)


CARD = Card(
    name=_NAME, kind="metric",
    title="Revisiting Discriminative vs. Generative Classifiers: Theory and Implications",
    paper="arXiv:2302.02334",
    summary="Test accuracy of Gaussian naive Bayes with a diagonal covariance shared by the classes "
            "on frozen features, beside the logistic-regression probe fitted on the same rows: "
            "the paper's generative vs discriminative linear evaluation (naive Bayes reaches its "
            "asymptote with fewer labelled samples in high dimension).",
    formula="mu_c = mean_{y=c} x; v_c = var_{y=c}(x) + eps (population variance), eps = 1e-9; "
            "s2 = sum_c pi_c v_c, pi_c = n_c / N; y_hat = argmax_c log pi_c - 1/2 sum_d "
            "(x_d - mu_cd)^2 / s2_d; logistic: sdk.metrics.fit_linear_probe (weight_decay 1e-4)",
    left_out="The paper's pre-trained vision backbones and its sweep over the number of "
             "labelled samples (call fit on growing subsets); its logistic regression is "
             "scikit-learn's, here the L-BFGS probe of sdk.metrics (standardised features).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(NaiveBayesProbe, card=CARD)
