"""Cosine Adapter: a query-dependent monotone map of raw retrieval cosines to relevance
probabilities, so that one global threshold filters irrelevant documents for every query.

Rossi, Lin, Liu, Yang, Lee, Magnani, Liao, "Relevance Filtering for Embedding-based
Retrieval", CIKM 2024 (arXiv:2408.04887).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from sdk.calibration import FIT_DTYPE, check_fit_inputs, fit_lbfgs
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import NotFittedError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator
from sdk.state import ResizableBuffers

__all__ = ["CARD", "MAPPINGS", "CosineAdapter", "cosine_map"]

MAPPINGS = ("linear", "sqrt", "power")
_WIDTH = {"linear": 2, "sqrt": 2, "power": 3}  # MLP outputs: a, b (and p for power)


def cosine_map(s: Tensor, params: Tensor, mapping: str = "linear") -> Tensor:
    """``m = sigmoid(a_q phi(s) + b_q)`` for cosines ``s [N]`` and the raw MLP outputs
    ``params [N, 2 or 3]`` of each row's query: ``a_q = softplus(params_0) > 0``, ``b_q =
    params_1``; ``phi(s) = s`` (linear), ``sqrt((s + 1) / 2)`` (sqrt) or ``((s + 1) / 2)^{p_q}``,
    ``p_q = softplus(params_2)`` (power). Every ``phi`` increases in ``s``, so ``m`` does for
    every query."""
    a, b = F.softplus(params[:, 0]), params[:, 1]
    half = (s.clamp(-1, 1) + 1) / 2
    if mapping == "linear":
        phi = s
    elif mapping == "sqrt":
        phi = half.sqrt()
    else:
        phi = half.pow(F.softplus(params[:, 2]))
    return torch.sigmoid(a * phi + b)


class CosineAdapter(ResizableBuffers, Calibrator):
    """``inputs = "similarities"``: scores ``[N, 1 + D]`` hold each (query, document) pair's
    cosine ``s`` in column 0 and the query's embedding in columns ``1..D``; labels are binary
    relevance. ``fit`` trains a one-hidden-layer MLP (``hidden`` ReLU units) from the query
    embedding to the parameters of :func:`cosine_map` by the binary cross-entropy (full-batch
    L-BFGS, ``max_iter`` iterations, deterministic from ``seed``, plus ``weight_decay`` times
    the squared weights); ``calibrator(scores)`` returns ``m`` ``[N, 1]`` and ``predict`` the
    filter ``m >= threshold`` ``[N]``."""

    inputs = "similarities"
    resizable_buffers = ("w1", "b1", "w2", "b2")

    def __init__(self, mapping: Annotated[str, one_of(MAPPINGS)] = "linear",
                 hidden: Annotated[int, Ge(1)] = 32, threshold: Annotated[float, Gt(0), Lt(1)] = 0.5,
                 weight_decay: Annotated[float, Ge(0)] = 1e-3, max_iter: Annotated[int, Ge(1)] = 200,
                 seed: int = 0):
        super().__init__()
        self.mapping, self.hidden, self.threshold = mapping, hidden, threshold
        self.weight_decay, self.max_iter, self.seed = weight_decay, max_iter, seed
        for name in self.resizable_buffers:
            self.register_buffer(name, torch.zeros(0, dtype=FIT_DTYPE))

    def _params(self, q: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        return torch.relu(q @ w1.T + b1) @ w2.T + b2

    def fit(self, scores: Tensor, labels: Tensor, **extra: Any) -> CosineAdapter:
        check_fit_inputs(self, scores, labels)
        s, q = scores[:, 0].detach().to(FIT_DTYPE), scores[:, 1:].detach().to(FIT_DTYPE)
        low, high = (float(v) for v in torch.aminmax(s))
        if low < -1 or high > 1:
            raise ShapeError(f"calibrator {self.name!r}: fit's scores column 0 must be cosines in "
                             f"[-1, 1], got the range [{low:.4g}, {high:.4g}]")
        g = torch.Generator().manual_seed(self.seed)
        d, h, k = q.shape[1], self.hidden, _WIDTH[self.mapping]
        bound = 1 / d ** 0.5
        w1 = ((torch.rand(h, d, generator=g, dtype=FIT_DTYPE) * 2 - 1) * bound).to(q.device)
        b1 = ((torch.rand(h, generator=g, dtype=FIT_DTYPE) * 2 - 1) * bound).to(q.device)
        w2 = torch.zeros(k, h, dtype=FIT_DTYPE, device=q.device)
        b2 = torch.zeros(k, dtype=FIT_DTYPE, device=q.device)
        y = labels.to(FIT_DTYPE).to(q.device)

        def loss() -> Tensor:
            m = cosine_map(s, self._params(q, w1, b1, w2, b2), self.mapping)
            value = F.binary_cross_entropy(m.clamp(1e-12, 1 - 1e-12), y)
            if self.weight_decay > 0:
                value = value + self.weight_decay * (w1.pow(2).sum() + w2.pow(2).sum())
            return value

        fit_lbfgs([w1, b1, w2, b2], loss, self.max_iter)
        device = self.w1.device
        self.w1, self.b1, self.w2, self.b2 = (t.detach().to(device) for t in (w1, b1, w2, b2))
        return self

    def query_parameters(self, scores: Tensor) -> Tensor:
        """The raw MLP outputs ``[N, 2 or 3]`` of each row's query embedding."""
        if self.w1.numel() == 0:
            raise NotFittedError(f"calibrator {self.name!r}: call fit(scores, labels) before calibrating")
        q = scores[:, 1:].to(FIT_DTYPE)
        if q.shape[1] != self.w1.shape[1]:
            raise ShapeError(f"calibrator {self.name!r}: its input has a query embedding of "
                             f"{q.shape[1]} columns {list(scores.shape)}, but it was fitted on "
                             f"{self.w1.shape[1]}")
        return self._params(q, self.w1, self.b1, self.w2, self.b2)

    def forward(self, scores: Tensor) -> Tensor:
        params = self.query_parameters(scores)
        return cosine_map(scores[:, 0].to(FIT_DTYPE), params, self.mapping)[:, None].to(scores.dtype)

    def predict(self, scores: Tensor) -> Tensor:
        """The relevance filter ``m >= threshold`` ``[N]`` (bool)."""
        return self(scores)[:, 0] >= self.threshold

    def example_inputs(self, batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        q = torch.randn(batch_size, 4, generator=g)
        s = torch.rand(batch_size, generator=g) * 2 - 1
        return torch.cat([s[:, None], q], dim=1), torch.arange(batch_size) % 2


CARD = Card(
    name="cosine_adapter", kind="calibrator",
    title="Relevance Filtering for Embedding-based Retrieval", paper="arXiv:2408.04887",
    summary="Maps raw query-document cosines to relevance probabilities by a monotone function "
            "whose parameters an MLP reads from the query embedding, so that one global "
            "threshold filters irrelevant results across queries whose cosine scales differ.",
    formula="m(s, q) = sigmoid(a_q phi(s) + b_q), (u_q, b_q[, v_q]) = MLP(q), a_q = softplus(u_q) "
            "> 0 (monotone in s); phi(s) = s, sqrt((s + 1) / 2) or ((s + 1) / 2)^{p_q}, p_q = "
            "softplus(v_q); fitted by binary cross-entropy against (query, document) relevance; "
            "filter m >= t, t = 0.5; inputs = 'similarities': scores [N, 1 + D] = (s, query "
            "embedding), labels relevance 0/1, output m [N, 1]",
    left_out="The retrieval model, the ANN index, the relevance reward model that labels the "
             "pairs, the MS MARCO / Walmart data and the online A/B test are not here. The MLP "
             "is one hidden ReLU layer (hidden = 32, not from the paper) fitted by deterministic "
             "full-batch L-BFGS (200 iterations, weight decay 1e-3 on the MLP's weights, not "
             "from the paper) rather than minibatch training; the formula follows the abstract "
             "and the method's description (a query-dependent monotone map, a global threshold). "
             "The paper's full text and code were not reachable: the three map families "
             "(linear, sqrt, power), the softplus slope and the threshold t = 0.5 are the seed "
             "catalogue's reconstruction, not checked against the paper.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(CosineAdapter, card=CARD)
