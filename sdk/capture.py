"""Named layers of a model: finding them, and reading what flows through them in one forward.

Layers are named as :meth:`torch.nn.Module.named_modules` names them (``"features.3"``,
``"layer4.1.conv2"``; ``""`` is the model itself). A name that is not there raises
:class:`~sdk.errors.ConfigError` naming the caller, the name, the closest names and the
available ones.

* :func:`submodule` / :func:`submodules`: the modules of given names.
* :class:`Taps`: a context manager whose forward hooks keep, for each named layer, the input
  tensor it received (``inputs``) and the output tensor it returned (``outputs``) during the
  forwards run inside it; the tensors keep their graph, so ``torch.autograd.grad(score,
  taps.outputs[name])`` is the gradient with respect to a layer's output. A layer that returns
  no tensor, that runs more than once in one forward (a shared module: which call is meant?),
  or whose output is modified in place after it returned (an in-place ReLU: the kept tensor
  would hold the ReLU's values) raises, naming the layer.
* :func:`layer_outputs`: the named layers' outputs of one forward without gradients, each
  flattened to ``[N, F]`` (the representations a probe reads).

The model runs as given: its mode (train or eval) is the caller's choice.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sdk.errors import ConfigError, ShapeError

__all__ = ["submodule", "submodules", "Taps", "layer_outputs"]


def submodule(model: nn.Module, name: str, owner: str) -> nn.Module:
    """The submodule ``name`` of ``model`` (``""``: the model itself); else a ConfigError naming
    ``owner`` and ``name`` and listing the available names."""
    named = dict(model.named_modules())
    if name in named:
        return named[name]
    available = [n for n in named if n]
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"{owner}: the model has no layer named {name!r}.{hint} Available: "
                      f"{', '.join(repr(n) for n in available) or 'none'} ('' is the model itself)",
                      param="layers")


def submodules(model: nn.Module, names: Sequence[str], owner: str) -> dict[str, nn.Module]:
    """:func:`submodule` of each name, in order; a name given twice raises."""
    if isinstance(names, str):
        raise ConfigError(f"{owner}: layers must be a sequence of layer names, got the string "
                          f"{names!r} (write ({names!r},))", param="layers")
    if len(names) == 0:
        raise ConfigError(f"{owner}: layers must name at least one layer", param="layers")
    if len(set(names)) != len(names):
        raise ConfigError(f"{owner}: layers names a layer twice: {list(names)}", param="layers")
    return {name: submodule(model, name, owner) for name in names}


class Taps:
    """``with Taps(model, names, owner) as taps: out = model(x)``: ``taps.inputs[name]`` and
    ``taps.outputs[name]`` are the first positional input and the output of each named layer
    in that forward (see :mod:`sdk.capture`); the hooks are removed on exit."""

    def __init__(self, model: nn.Module, names: Sequence[str], owner: str):
        self.owner = owner
        self.modules = submodules(model, names, owner)
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name in self.outputs:
                raise ConfigError(f"{self.owner}: layer {name!r} ran more than once in one forward "
                                  "(a shared module); name a layer that runs once", param="layers")
            if not isinstance(out, Tensor):
                raise ShapeError(f"{self.owner}: layer {name!r} returned a "
                                 f"{type(out).__name__}, not a tensor")
            if args and isinstance(args[0], Tensor):
                self.inputs[name] = args[0]
            self.outputs[name] = out
            self._versions[name] = out._version
        return hook

    def __enter__(self) -> Taps:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check(self) -> None:
        """After the forward: every named layer ran, and no output was changed in place."""
        for name in self.modules:
            if name not in self.outputs:
                raise ConfigError(f"{self.owner}: layer {name!r} did not run in the forward",
                                  param="layers")
            if self.outputs[name]._version != self._versions[name]:
                raise ConfigError(f"{self.owner}: the output of layer {name!r} was modified in "
                                  "place after the layer returned it (an in-place activation such "
                                  "as ReLU(inplace=True)?); make that operation out of place",
                                  param="layers")


def layer_outputs(model: nn.Module, x: Tensor, names: Sequence[str], owner: str) -> dict[str, Tensor]:
    """``{name: output [N, F]}``: each named layer's output in one forward of ``model`` on ``x``
    without gradients, flattened after the batch dimension."""
    with torch.no_grad(), Taps(model, names, owner) as taps:
        model(x)
    taps.check()
    out = {}
    for name in taps.modules:
        h = taps.outputs[name]
        if h.dim() < 1 or h.shape[0] != x.shape[0]:
            raise ShapeError(f"{owner}: layer {name!r} returned {list(h.shape)}, not a batch of "
                             f"{x.shape[0]} rows [N, ...]")
        out[name] = h.reshape(h.shape[0], -1)
    return out
