"""Compressing features against noisy labels: nested dropout (or dropout) on the features that
feed a linear classifier.

Chen, Hu, Shen, Ai and Suykens, "Compressing Features for Learning with Noisy Labels", IEEE TNNLS
2022, arXiv:2206.13140 (authors' code: Nested-Co-teaching).

Training: per batch, one ``k`` in ``1..F`` is drawn with ``p(k) ∝ exp(-((k - mu) / sigma)^2)``
(``mu = 0``, the authors' setting) and only the first ``k`` of the ``F`` features are kept,
``logits = W^T (h ⊙ 1[i <= k])``; this orders the features by importance, a compression of the
representation that keeps the classifier from fitting the label noise. ``compression="dropout"``
applies plain dropout on ``h`` instead. Evaluation keeps the first ``eval_k`` features (the
paper picks the best ``K`` on a validation set).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.constraints import one_of
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import check_features, mlp_layers

COMPRESSIONS = ("nested", "dropout", "none")


def nested_probabilities(num_features: int, sigma: float, mu: float = 0.0) -> Tensor:
    """``p(k) = exp(-((k - mu) / sigma)^2) / Z`` for ``k = 1..num_features`` (float64)."""
    k = torch.arange(1, num_features + 1, dtype=torch.float64)
    w = torch.exp(-((k - mu) / sigma) ** 2)
    return w / w.sum()


class CompressedFeatures(Encoder):
    """``logits = classifier(compress(h))``, ``h = features(x)`` (``backbone``'s output, or an
    MLP ``in_dim -> hidden_dims -> feat_dim`` on the flattened input) and ``classifier`` a
    bias-free linear layer to ``num_classes`` (as in the authors' code). ``compression``:
    ``"nested"`` (nested dropout with width ``nested_sigma``), ``"dropout"`` (rate ``dropout``),
    or ``"none"`` (a plain linear classifier on ``h``). ``eval_k``: the number of leading features
    kept in evaluation (``None``: all)."""

    def __init__(self, backbone: Encoder | None = None,
                 in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 hidden_dims: tuple[int, ...] | list[int] = (256,),
                 feat_dim: Annotated[int, Ge(1)] = 128,
                 num_classes: Annotated[int, Ge(2), FromData("num_classes")] = 10,
                 compression: Annotated[str, one_of(COMPRESSIONS)] = "nested",
                 nested_sigma: Annotated[float, Gt(0)] = 100.0,
                 dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.5,
                 eval_k: Annotated[int | None, Ge(1)] = None):
        super().__init__()
        self.backbone = backbone
        if backbone is None:
            self.in_dim, self.feat_dim = in_dim, feat_dim
            self.net = mlp_layers([in_dim, *hidden_dims, feat_dim])
        else:
            self.in_dim, self.feat_dim = None, backbone.out_dim
        if eval_k is not None and eval_k > self.feat_dim:
            raise ConfigError(f"compressed_features_noisy_labels: eval_k={eval_k} exceeds the "
                              f"{self.feat_dim} features", param="eval_k")
        self.out_dim, self.compression, self.eval_k = num_classes, compression, eval_k
        self.dropout = dropout
        self.register_buffer("k_probs", nested_probabilities(self.feat_dim, nested_sigma).float())
        self.classifier = nn.Linear(self.feat_dim, num_classes, bias=False)

    def features(self, x: Tensor) -> Tensor:
        if self.backbone is not None:
            return self.backbone(x)
        if x.dim() < 2:
            raise ShapeError(f"encoder 'compressed_features_noisy_labels': x must be a batch [B, ...] "
                             f"of {self.in_dim} features, got {list(x.shape)}")
        x = x.flatten(1)
        check_features("encoder 'compressed_features_noisy_labels'", "x (flattened)", x,
                       self.in_dim, module=self.net, batch_norm=True)
        return self.net(x)

    def compress(self, h: Tensor) -> Tensor:
        """The training-time compression of ``h [B, F]`` (see the module docstring); in
        evaluation, the first ``eval_k`` features."""
        positions = torch.arange(1, h.shape[1] + 1, device=h.device)
        if not self.training:
            return h if self.eval_k is None else h * (positions <= self.eval_k).to(h.dtype)
        if self.compression == "dropout":
            return torch.nn.functional.dropout(h, self.dropout, training=True)
        if self.compression == "nested":
            k = torch.multinomial(self.k_probs, 1) + 1                 # one k per batch
            return h * (positions <= k).to(h.dtype)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.compress(self.features(x)))


CARD = Card(
    name="compressed_features_noisy_labels", kind="encoder",
    title="Compressing Features for Learning with Noisy Labels",
    paper="arXiv:2206.13140",
    summary="Nested dropout (keep the first k features, k drawn per batch from a half-Gaussian) "
            "or dropout on the features before a linear classifier, against label noise.",
    formula="p(k) ∝ exp(-(k/sigma)^2), k = 1..F; logits = W^T (h ⊙ 1[i <= k]) in training, "
            "W^T (h ⊙ 1[i <= eval_k]) in evaluation",
    left_out="Stage two of the paper, fine-tuning two compressed networks with Co-teaching "
             "(each trains on the peer's small-loss samples, forget rate 0.2-0.3), is not here: it "
             "needs two networks exchanging samples in one step. The paper's choice of eval_k on "
             "a clean validation set is left to the user. Defaults: nested_sigma=100 (the paper's "
             "Clothing1M/ANIMAL-10N setting; 10 for CIFAR-10), dropout=0.5 (not checked "
             "against the paper), mu=0 as in the authors' code.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CompressedFeatures, card=CARD)
