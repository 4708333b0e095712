"""ODIN: temperature scaling and input perturbation.

Liang, Li and Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in
Neural Networks", ICLR 2018.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.interfaces import Detector
from sdk.ood import max_softmax


def odin_score(model: nn.Module | None, x: Tensor, temperature: float = 1000.0,
               epsilon: float = 0.0014) -> Tensor:
    """Anomaly score ``-max_c softmax(f(x~) / T)_c`` with the perturbed input
    ``x~ = x - eps * sign(-grad_x log max_c softmax(f(x) / T)_c)``; ``model=None`` takes ``f``
    to be the identity (``x`` are logits). Gradients flow to ``x`` only, never into ``model``'s
    parameters; the score itself carries no gradient."""
    f = (lambda t: t) if model is None else model
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_()
        log_s = torch.log_softmax(f(leaf).float() / temperature, dim=-1).amax(-1)
        (grad,) = torch.autograd.grad(log_s.sum(), leaf)
    with torch.no_grad():
        perturbed = leaf.detach() - epsilon * torch.sign(-grad)
        return -max_softmax(f(perturbed), temperature)


class ODIN(Detector):
    """ODIN with the paper's ``T = 1000`` and ``eps = 0.0014``. With ``model`` the detector
    takes the model's inputs (``inputs = "features"``: rows ``[N, D]``) and perturbs them
    through the model; without one it takes logits and perturbs them directly."""

    inputs = "features"

    def __init__(self, model: nn.Module | None = None, temperature: Annotated[float, Gt(0)] = 1000.0,
                 epsilon: Annotated[float, Ge(0)] = 0.0014):
        super().__init__()
        self.model, self.temperature, self.epsilon = model, temperature, epsilon
        if model is None:
            self.inputs = "logits"

    def forward(self, x: Tensor) -> Tensor:
        return odin_score(self.model, x, self.temperature, self.epsilon)


CARD = Card(
    name="odin", kind="detector",
    title="Enhancing The Reliability of Out-of-distribution Image Detection in Neural Networks",
    paper="arXiv:1706.02690",
    summary="Maximum softmax probability at a high temperature after a small input step that "
            "raises it (in-distribution inputs gain more); negated so that higher means more "
            "anomalous. Defaults T = 1000, eps = 0.0014 (the paper's CIFAR-10 DenseNet setting).",
    formula="x~ = x - eps sign(-grad_x log S_yhat(x; T)), S_c(x; T) = softmax(f(x) / T)_c; "
            "s(x) = -max_c S_c(x~; T)",
    left_out="Tuning T and eps on held-out OOD data (the paper's grid); the division of the "
             "gradient sign by the per-channel std of the authors' image normalisation (the "
             "step is taken in the space of the model's inputs); inputs of rank > 2 (images are "
             "passed flattened, the model reshapes them). torch.sign maps a zero gradient to 0 "
             "where the authors' code uses +1.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(ODIN, card=CARD)
