"""Temperature scaling: one scalar T fitted on held-out logits by minimising the NLL.

Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt

from sdk.calibration import check_fit_inputs
from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Calibrator


class TemperatureScaling(Calibrator):
    """``softmax(z / T)``; ``T = exp(log_t)`` fitted with L-BFGS on the NLL of held-out data."""

    inputs = "logits"

    def __init__(self, max_iter: Annotated[int, Ge(1)] = 100, lr: Annotated[float, Gt(0)] = 0.1):
        super().__init__()
        self.max_iter, self.lr = max_iter, lr
        self.log_t = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    @property
    def temperature(self) -> float:
        return float(self.log_t.exp())

    def fit(self, logits: torch.Tensor, labels: torch.Tensor, **extra) -> TemperatureScaling:
        check_fit_inputs(self, logits, labels)
        logits = logits.detach().float()
        log_t = torch.zeros((), device=logits.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=self.lr, max_iter=self.max_iter,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            self.log_t.copy_(log_t.detach())
        return self

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.log_t.exp().to(logits.dtype)


CARD = Card(
    name="temperature_scaling", kind="calibrator",
    title="On Calibration of Modern Neural Networks", paper="arXiv:1706.04599",
    summary="Divides logits by one temperature fitted on held-out data by minimising NLL; "
            "keeps the argmax, fixes over-confidence.",
    formula="p = softmax(z / T), T = argmin_T sum_i -log softmax(z_i / T)_{y_i}",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(TemperatureScaling, card=CARD)
