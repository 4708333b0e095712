"""Linear-probe and kNN accuracy of the representation at each layer of an encoder.

Xue, Gan, Ni, Joshi, Mirzasoleiman, "Investigating the Benefits of Projection Head for
Representation Learning", ICLR 2024 (arXiv:2403.11391): training with a projection head and
discarding it works because of layer-wise progressive feature weighting: deeper layers weigh
features increasingly unequally, so lower layers keep more normalised, less specialised
representations that can transfer better when the pretraining and downstream objectives are
misaligned. The paper shows this by probing the representations before the head and after each
of its layers; this metric measures the same thing for any list of layers.

Capture each layer's representation with :func:`sdk.capture.layer_outputs` (forward hooks,
flattened to ``[N, F]``), then ``fit(train_labels, *train_features)`` fits, per layer, the
linear probe of :func:`sdk.metrics.fit_linear_probe` (multinomial logistic regression on
standardised features, L-BFGS) and the weighted kNN bank of :func:`sdk.metrics.knn_predict`;
``update(test_labels, *test_features)`` counts their correct predictions.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from sdk.card import Card
from sdk.errors import ConfigError, NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Metric
from sdk.metrics import KNNAccuracy, LinearProbe, check_embeddings, check_finite

_NAME = "layerwise_probe"


def _example(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``fit`` / ``update`` arguments for the conformance kit: labels ``i % 3`` and two layers'
    features, ``[B, 8]`` around one mean per class and a noisier ``[B, 4]``."""
    labels = torch.arange(batch_size) % 3
    low = 3 * torch.eye(3, 8)[labels] + torch.randn(batch_size, 8, generator=generator)
    high = torch.eye(3, 4)[labels] + torch.randn(batch_size, 4, generator=generator)
    return labels, low, high


class LayerwiseProbe(Metric):
    """``fit(train_labels, *train_features)`` and ``update(test_labels, *test_features)`` take the
    labels ``[N]`` and one ``[N, F_l]`` representation per layer, in the order of ``layers``
    (their names; empty: ``"0"``, ``"1"``, ...); ``compute()`` gives ``linear_probe@<layer>``
    and ``knn@<layer>``, the test accuracies of each layer's probes."""

    example_inputs = staticmethod(_example)

    def __init__(self, layers: tuple[str, ...] = (), weight_decay: Annotated[float, Ge(0)] = 1e-4,
                 max_iter: Annotated[int, Ge(1)] = 1000, k: Annotated[int, Ge(1)] = 20,
                 temperature: Annotated[float, Gt(0)] = 0.07):
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{_NAME}: layers names a layer twice: {list(layers)}", param="layers")
        self.layers = tuple(layers)
        self.weight_decay, self.max_iter, self.k, self.temperature = weight_decay, max_iter, k, temperature
        self.reset()

    def _names(self, count: int) -> tuple[str, ...]:
        return self.layers or tuple(str(i) for i in range(count))

    def _check(self, labels: Tensor, features: tuple[Tensor, ...], call: str) -> tuple[str, ...]:
        if not features:
            raise ShapeError(f"{_NAME}: {call}(labels, *features) needs the features of at least one layer")
        if self.layers and len(features) != len(self.layers):
            raise ShapeError(f"{_NAME}: {call} got features of {len(features)} layers for the "
                             f"{len(self.layers)} layers {list(self.layers)}")
        names = self._names(len(features))
        for name, f in zip(names, features):
            check_embeddings(_NAME, f, labels, f"features of layer {name!r}")
            if not f.is_floating_point():
                raise ShapeError(f"{_NAME}: features of layer {name!r} must be floating, got {f.dtype}")
        return names

    def fit(self, labels: Tensor, *features: Tensor) -> LayerwiseProbe:
        names = self._check(labels, features, "fit")
        if labels.shape[0] == 0:
            raise ShapeError(f"{_NAME}: fit got no rows (labels is empty)")
        for name, f in zip(names, features):
            check_finite(_NAME, f"features of layer {name!r}", f)
        self._probes = [LinearProbe(self.weight_decay, self.max_iter).fit(f, labels) for f in features]
        self._knn = [KNNAccuracy(self.k, self.temperature).fit(f, labels) for f in features]
        self._widths = [f.shape[1] for f in features]
        return self

    def update(self, labels: Tensor, *features: Tensor) -> None:
        if not self._probes:
            raise NotFittedError(f"{_NAME}: call fit(train_labels, *train_features) before update()")
        self._check(labels, features, "update")
        if [f.shape[1] for f in features] != self._widths:
            raise ShapeError(f"{_NAME}: update got features of widths {[f.shape[1] for f in features]}; "
                             f"fit's were {self._widths} (one per layer, in order)")
        for probe, knn, f in zip(self._probes, self._knn, features):
            probe.update(f, labels)
            knn.update(f, labels)

    def compute(self) -> dict[str, float]:
        if not self._probes:
            return {}
        names = self._names(len(self._probes))
        out = {f"linear_probe@{n}": p.compute() for n, p in zip(names, self._probes)}
        out.update({f"knn@{n}": k.compute() for n, k in zip(names, self._knn)})
        return out

    def reset(self) -> None:
        self._probes: list[LinearProbe] = []
        self._knn: list[KNNAccuracy] = []
        self._widths: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for i, (probe, knn) in enumerate(zip(self._probes, self._knn)):
            state.update({f"{i}.probe.{key}": v for key, v in probe.state_dict().items()})
            state.update({f"{i}.knn.{key}": v for key, v in knn.state_dict().items()})
        return state

    def load_state_dict(self, state: Any) -> None:
        self.reset()
        count = len({key.split(".", 1)[0] for key in state})
        for i in range(count):
            parts = {part: {key[len(f"{i}.{part}."):]: v for key, v in state.items()
                            if key.startswith(f"{i}.{part}.")} for part in ("probe", "knn")}
            probe, knn = LinearProbe(self.weight_decay, self.max_iter), KNNAccuracy(self.k, self.temperature)
            probe.load_state_dict(parts["probe"])
            knn.load_state_dict(parts["knn"])
            self._probes.append(probe)
            self._knn.append(knn)
            self._widths.append(int(probe.probe.weight.shape[0]))


CARD = Card(
    name=_NAME, kind="metric",
    title="Investigating the Benefits of Projection Head for Representation Learning",
    paper="arXiv:2403.11391",
    summary="Linear-probe and weighted-kNN test accuracy of the representation at each layer of "
            "an encoder (before the projection head and after each of its layers), to show "
            "where features transfer best; capture the layers with sdk.capture.layer_outputs, "
            "then fit(train_labels, *train_features) and update(test_labels, *test_features).",
    formula="per layer l: h_l(x) = flattened output of layer l; linear_probe@l = test accuracy "
            "of argmax(W standardise(h_l) + b), (W, b) = argmin mean CE + weight_decay / 2 "
            "||W||^2 (L-BFGS, max_iter); knn@l = test accuracy of argmax_c sum_{j in top-k "
            "cos} exp(s_j / temperature) [y_j = c]",
    left_out="The paper's fixed reweighting head (its authors' code: a frozen diagonal head "
             "z_i = kappa^(-i) h_i trained through in place of the MLP head) is a training "
             "component, not a measurement, and is not here. The probes are sdk.metrics' fixed "
             "recipes (L-BFGS logistic regression with weight_decay 1e-4, kNN with k = 20 and "
             "temperature 0.07), not the paper's probe training schedule, which could not be read "
             "here; the kNN probe is an addition to the paper's linear probes. The paper's "
             "theory (two-layer linear models, spectral contrastive loss) and its CIFAR, "
             "UrbanCars and shifted-ImageNet experiments are not here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(LayerwiseProbe, card=CARD)
