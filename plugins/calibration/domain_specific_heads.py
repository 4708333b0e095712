"""Domain-specific risk minimisation (DRM): one classifier head per training domain on shared
features, each fitted on its own domain's rows only; at test time each sample is classified by
the head whose prediction has the lowest entropy.

Zhang, Wang, Li, Li, Zhu, Wang, "Domain-Specific Risk Minimization for Out-of-Distribution
Generalization", KDD 2023 (arXiv:2208.08661).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import Tensor

from sdk.adaptation import softmax_entropy
from sdk.calibration import FIT_DTYPE, check_fit_inputs, fit_linear_head
from sdk.card import Card
from sdk.context import FromData
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "DomainSpecificHeads", "route_by_entropy"]


def route_by_entropy(head_logits: Tensor) -> Tensor:
    """``head_logits [N, K, C]`` (K heads): the head of lowest softmax entropy per row ``[N]``
    (ties: the lowest head id)."""
    return softmax_entropy(head_logits.flatten(0, 1)).view(head_logits.shape[:2]).argmin(dim=1)


class DomainSpecificHeads(ResizableBuffers, Calibrator):
    """``inputs = "features"``, ``fit_requires = {"domains"}``: ``fit(features [N, D], labels,
    domains=ids)`` fits one softmax head per domain id ``0..K-1`` (every id present) on that
    domain's rows (``weight_decay``, ``max_iter``); ``calibrator(features)`` returns, per row,
    the logits ``[N, num_classes]`` of the head with the lowest prediction entropy
    (:func:`route_by_entropy`); the domain is not needed at test time."""

    inputs = "features"
    fit_requires = frozenset({"domains"})
    resizable_buffers = ("weights", "biases")

    def __init__(self, num_classes: Annotated[int, Ge(2), FromData("num_classes")] = 10,
                 weight_decay: Annotated[float, Ge(0)] = 1e-3, max_iter: Annotated[int, Ge(1)] = 200):
        super().__init__()
        self.num_classes, self.weight_decay, self.max_iter = num_classes, weight_decay, max_iter
        self.register_buffer("weights", torch.zeros(0, dtype=FIT_DTYPE))
        self.register_buffer("biases", torch.zeros(0, dtype=FIT_DTYPE))

    def fit(self, features: Tensor, labels: Tensor, *, domains: Tensor,
            **extra: Any) -> DomainSpecificHeads:
        check_fit_inputs(self, features, labels)
        domains = domains.to(features.device)
        counts = torch.bincount(domains)
        if bool((counts == 0).any()):
            raise ShapeError(f"calibrator {self.name!r}: domains must use every id 0..K-1, got "
                             f"row counts {counts.tolist()} per id")
        x = features.detach().to(FIT_DTYPE)
        heads = [fit_linear_head(x[domains == k], labels[domains == k], self.num_classes,
                                 weight_decay=self.weight_decay, max_iter=self.max_iter)
                 for k in range(counts.numel())]
        device = self.weights.device
        self.weights = torch.stack([w for w, _ in heads]).to(device)
        self.biases = torch.stack([b for _, b in heads]).to(device)
        return self

    def head_logits(self, features: Tensor) -> Tensor:
        """Every head's logits ``[N, K, num_classes]``."""
        if self.weights.numel() == 0:
            raise NotFittedError(f"calibrator {self.name!r}: call fit(features, labels, domains=...) "
                                 "before calibrating")
        if features.shape[1] != self.weights.shape[2]:
            raise ShapeError(f"calibrator {self.name!r}: its input has {features.shape[1]} feature "
                             f"columns {list(features.shape)}, but it was fitted on "
                             f"{self.weights.shape[2]}")
        return torch.einsum("nd,kcd->nkc", features.to(FIT_DTYPE), self.weights) + self.biases

    def route(self, features: Tensor) -> Tensor:
        """The head each row is classified by ``[N]``."""
        return route_by_entropy(self.head_logits(self._scores(features, "its input")))

    def forward(self, features: Tensor) -> Tensor:
        z = self.head_logits(features)
        pick = route_by_entropy(z)
        return z[torch.arange(z.shape[0], device=z.device), pick].to(features.dtype)

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        n = max(batch_size, 2 * self.num_classes)
        labels = torch.arange(n) % self.num_classes
        x = 2 * torch.nn.functional.one_hot(labels, self.num_classes).float()[:, :4]
        return x + torch.randn(n, 4, generator=g), labels, {"domains": torch.arange(n) % 2}


CARD = Card(
    name="domain_specific_heads", kind="calibrator",
    title="Domain-Specific Risk Minimization for Out-of-Distribution Generalization",
    paper="arXiv:2208.08661",
    summary="One classifier head per training domain on shared features, each minimising its "
            "own domain's risk; a test sample of unknown domain is classified by the head that "
            "is most certain of it (lowest prediction entropy).",
    formula="h_k = argmin_h E_{(x, y) in domain k} CE(h(f(x)), y) (+ 1e-3 ||W_k||^2); at test "
            "k*(x) = argmin_k H(softmax(h_k(f(x)))), y_hat = h_{k*(x)}(f(x)); inputs = 'features' "
            "[N, D], fit_requires = {'domains'} (ids [N], known at fit time only), output logits "
            "[N, num_classes]",
    left_out="The shared encoder trained jointly with the heads (the encoder part of DRM) is not "
             "here: the calibrator fits the heads on fixed features, each by deterministic "
             "L-BFGS with weight decay 1e-3 (not from the paper). The per-sample lowest-entropy "
             "selection follows the method's description; the paper's full text (any ensembling "
             "of heads or test-time update) was not available here beyond its abstract, so "
             "neither is implemented.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(DomainSpecificHeads, card=CARD)
