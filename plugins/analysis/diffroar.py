"""DiffROAR: does an attribution rank the discriminative features first?

Shah, Jain, Netrapalli, "Do Input Gradients Highlight Discriminative Features?", NeurIPS 2021
(arXiv:2102.12781). For a level ``k`` (the fraction of features left unmasked), every instance
keeps its ``k`` share of features with the largest attribution magnitude ``|A|`` (top-k) or the
smallest (bottom-k), the rest set to the mask value; a fresh model is trained on the masked
training set and tested on the masked test set, and ``DiffROAR(k) = acc_top(k) - acc_bot(k)``:
positive when the attribution highlights discriminative features, about 0 for a random one,
negative under feature inversion. As in the authors' code, ``round((1 - k) D)`` features are
masked and the mask value is the data mean (here the training mean of each feature).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import Tensor

from sdk.card import Card
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import check_embeddings, check_finite, fit_linear_probe, nan_if_any_nan

_NAME = "diffroar"
_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def keep_mask(attributions: Tensor, k: float, top: bool = True) -> Tensor:
    """Boolean ``[N, D]``: each row's ``D - round((1 - k) D)`` features of largest (``top``) or
    smallest ``|A|`` (ties in column order)."""
    n, d = attributions.shape
    kept = d - round((1 - k) * d)
    order = attributions.abs().argsort(dim=1, descending=top, stable=True)[:, :kept]
    return torch.zeros(n, d, dtype=torch.bool, device=attributions.device).scatter_(1, order, True)


def masked(x: Tensor, attributions: Tensor, k: float, top: bool, fill: Tensor) -> Tensor:
    """``x`` with every feature outside :func:`keep_mask` replaced by ``fill [D]``."""
    return torch.where(keep_mask(attributions, k, top), x, fill.to(x))


def _check(x: Tensor, attributions: Tensor, labels: Tensor, what: str) -> None:
    check_embeddings(_NAME, x, labels, what)
    if not x.is_floating_point():
        raise ShapeError(f"{_NAME}: {what} must be floating [N, D], got dtype {x.dtype}")
    if attributions.shape != x.shape or not attributions.is_floating_point():
        raise ShapeError(f"{_NAME}: attributions of {what} must be floating {list(x.shape)}, got "
                         f"{attributions.dtype} {list(attributions.shape)}")


def _example(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``fit`` / ``update`` arguments for the conformance kit: ``x [B, 6]`` whose first two
    features carry the class ``i % 2``, the oracle attribution, the labels."""
    labels = torch.arange(batch_size) % 2
    x = torch.randn(batch_size, 6, generator=generator)
    x[:, :2] += 2 * labels[:, None] - 1
    attributions = torch.zeros(batch_size, 6)
    attributions[:, :2] = 1
    return x, attributions + 0.01 * torch.rand(batch_size, 6, generator=generator), labels


class DiffROAR(Metric):
    """``fit(train_x, train_attributions, train_y)`` keeps the training rows;
    ``update(test_x, test_attributions, test_y)`` adds test rows; ``compute()`` retrains
    :func:`sdk.metrics.fit_linear_probe` (the fixed retraining recipe) on each level's top-k
    and bottom-k masked training set and gives ``diffroar@k`` per level and their mean
    ``diffroar``."""

    example_inputs = staticmethod(_example)

    def __init__(self, levels: tuple[Annotated[float, Interval(gt=0, le=1)], ...] = _LEVELS,
                 weight_decay: Annotated[float, Ge(0)] = 1e-4, max_iter: Annotated[int, Ge(1)] = 1000):
        self.levels, self.weight_decay, self.max_iter = tuple(levels), weight_decay, max_iter
        self._train: tuple[Tensor, Tensor, Tensor] | None = None
        self._test: list[tuple[Tensor, Tensor, Tensor]] = []

    def fit(self, train_x: Tensor, train_attributions: Tensor, train_y: Tensor) -> DiffROAR:
        _check(train_x, train_attributions, train_y, "train_x")
        check_finite(_NAME, "train_x", train_x)
        check_finite(_NAME, "train_attributions", train_attributions)
        self._train = (train_x.detach().double(), train_attributions.detach().double(), train_y.long())
        self._test = []
        return self

    def update(self, test_x: Tensor, test_attributions: Tensor, test_y: Tensor) -> None:
        if self._train is None:
            raise NotFittedError(f"{_NAME}: call fit(train_x, train_attributions, train_y) before update()")
        _check(test_x, test_attributions, test_y, "test_x")
        if test_x.shape[1] != self._train[0].shape[1]:
            raise ShapeError(f"{_NAME}: test_x must be [N, {self._train[0].shape[1]}] like train_x, got "
                             f"{list(test_x.shape)}")
        self._test.append((test_x.detach().double(), test_attributions.detach().double(), test_y.long()))

    def compute(self) -> dict[str, float]:
        keys = [f"diffroar@{k:g}" for k in self.levels]
        if self._train is None or not self._test:
            return dict.fromkeys(["diffroar", *keys], math.nan)
        x, a, y = self._train
        tx, ta, ty = (torch.cat([t[i].to(x.device) for t in self._test]) for i in range(3))
        fill = x.mean(0)
        n_classes = int(max(int(y.max()), int(ty.max()))) + 1
        poison = nan_if_any_nan(tx) + nan_if_any_nan(ta)
        out: dict[str, float] = {}
        for key, k in zip(keys, self.levels):
            acc = []
            for top in (True, False):
                probe = fit_linear_probe(masked(x, a, k, top, fill), y, self.weight_decay,
                                         self.max_iter, num_classes=n_classes)
                pred = probe.predict(masked(tx, ta, k, top, fill))
                acc.append((pred == ty).double().mean())
            out[key] = float(acc[0] - acc[1] + poison)
        return {"diffroar": sum(out.values()) / len(out), **out}

    def reset(self) -> None:
        self._train, self._test = None, []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._train is not None:
            state.update(train_x=self._train[0], train_attributions=self._train[1], train_y=self._train[2])
        if self._test:
            state.update({name: torch.cat([t[i] for t in self._test])
                          for i, name in enumerate(("test_x", "test_attributions", "test_y"))})
        return {k: v.clone() for k, v in state.items()}

    def load_state_dict(self, state: Any) -> None:
        state = {k: torch.as_tensor(v).clone() for k, v in state.items()}
        self.reset()
        if "train_x" in state:
            self._train = (state["train_x"], state["train_attributions"], state["train_y"])
        if "test_x" in state:
            self._test = [(state["test_x"], state["test_attributions"], state["test_y"])]


CARD = Card(
    name=_NAME, kind="metric",
    title="Do Input Gradients Highlight Discriminative Features?",
    paper="arXiv:2102.12781",
    summary="DiffROAR attribution quality: retrain on the top-k versus the bottom-k attributed "
            "features of every instance (the rest set to the training mean) and take the "
            "difference of test accuracies, per unmasked fraction k and averaged; > 0 when the "
            "attribution highlights discriminative features, ~0 for random attributions, < 0 "
            "under feature inversion.",
    formula="keep_top(x, k) = the D - round((1 - k) D) features of largest |A(x)|, others := "
            "mean of train_x; DiffROAR(k) = acc(h_top on masked test) - acc(h_bot on masked "
            "test), h retrained on the masked train set; levels 0.05, 0.1, 0.2, ..., 0.9; "
            "diffroar = mean over levels",
    left_out="The paper retrains its CIFAR-10 / ImageNet-10 ResNets (and MLPs on BlockMNIST) on "
             "each masked dataset; here the fixed recipe is the L-BFGS logistic probe of "
             "sdk.metrics (weight_decay 1e-4), so DiffROAR measures linearly usable signal. The "
             "authors mask with one data-mean value; here each feature's training mean. Level "
             "k = 1 (DiffROAR = 0 by construction) is not in the default levels. The attributions "
             "(input gradients of standard or adversarially trained models) are inputs; the "
             "BlockMNIST data and the one-hidden-layer theory are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DiffROAR, card=CARD)
