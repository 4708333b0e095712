"""Tent: test-time entropy minimisation over the batch-normalisation affine parameters.

Wang, Shelhamer, Liu, Olshausen and Darrell, "Tent: Fully Test-Time Adaptation by Entropy
Minimization", ICLR 2021.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn

from sdk.adaptation import batch_norm_layers, softmax_entropy
from sdk.card import Card
from sdk.constraints import one_of
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Adapter
from sdk.types import Batch


def tent_loss(logits: Tensor) -> Tensor:
    """The mean prediction entropy of the batch, ``1/B sum_i H(softmax(z_i))``."""
    return softmax_entropy(logits).mean()


class Tent(Adapter):
    """On the first batch: every parameter frozen but the BN layers' weight and bias, the BN
    layers in training mode without running statistics (they normalise with the batch's);
    then per batch ``steps`` optimizer steps on :func:`tent_loss`. Returns the outputs of the
    forward the (last) step was computed on, as the authors' code: predictions are made and
    then the model is updated for the next batch. ``reset()`` restores the model and drops the
    optimizer's moments (episodic use)."""

    def __init__(self, lr: Annotated[float, Gt(0)] = 1e-3,
                 optimizer: Annotated[str, one_of(("adam", "sgd"))] = "adam",
                 momentum: Annotated[float, Ge(0)] = 0.9, steps: Annotated[int, Ge(1)] = 1):
        super().__init__()
        self.lr, self.optimizer, self.momentum, self.steps = lr, optimizer, momentum, steps
        self._opt: torch.optim.Optimizer | None = None
        self._tracked: list[tuple[nn.Module, bool]] = []
        self._hooks: list[Any] = []

    def _configure(self, model: nn.Module) -> None:
        layers = batch_norm_layers(model, f"adapter {self.name!r}")
        params = [p for m in layers for p in (m.weight, m.bias) if p is not None]
        if not params:
            raise ConfigError(f"adapter {self.name!r}: the model's BatchNorm layers have no affine "
                              "parameters (affine=False) to adapt", param="model")
        model.requires_grad_(False)
        self._tracked = [(m, m.track_running_stats) for m in layers]
        for m in layers:
            m.requires_grad_(True)
            m.track_running_stats = False
            m.train()
            self._hooks.append(m.register_forward_pre_hook(self._check_rows))
        self._opt = (torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999)) if self.optimizer == "adam"
                     else torch.optim.SGD(params, lr=self.lr, momentum=self.momentum))

    def _check_rows(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        (h,) = args
        if h.dim() >= 2 and h.numel() == h.shape[1]:
            raise ShapeError(f"adapter {self.name!r}: a batch of one row with no spatial positions "
                             f"gives BatchNorm one value per channel (input {list(h.shape)}); adapt "
                             "on batches of two or more")

    def forward(self, model: nn.Module, x: Tensor, batch: Batch) -> Tensor:
        if self._opt is None:
            self._configure(model)
        for _ in range(self.steps):
            with torch.enable_grad():
                out = model(x)
                tent_loss(out).backward()
            self._opt.step()
            self._opt.zero_grad()
        return out.detach()

    def reset(self) -> None:
        for m, tracked in self._tracked:
            m.track_running_stats = tracked
        for hook in self._hooks:
            hook.remove()
        self._tracked, self._hooks, self._opt = [], [], None
        super().reset()


CARD = Card(
    name="tent", kind="adapter",
    title="Tent: Fully Test-Time Adaptation by Entropy Minimization",
    paper="arXiv:2006.10726",
    summary="Minimises the entropy of the model's predictions on each test batch over the "
            "BatchNorm layers' scale and shift only, with test-batch normalisation statistics; "
            "one Adam step per batch (lr 1e-3, the authors' CIFAR setting); reset() for episodic "
            "use.",
    formula="min_{gamma, beta} 1/B sum_i H(softmax(f(x_i; gamma, beta))), H(p) = -sum_c p_c log p_c; "
            "BN with the batch's mean and variance",
    left_out="Only the BN layers are put in training mode (the authors' code calls model.train(), "
             "which would also turn dropout on); their running buffers are kept (not set to None) "
             "but no longer used or updated. The ImageNet setting (SGD, lr 2.5e-4, momentum 0.9) is "
             "optimizer='sgd' with its lr given. Collapse over long streams is not prevented "
             "(reset() is the remedy the paper offers).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(Tent, card=CARD)
