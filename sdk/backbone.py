"""Bring your own backbone: any ``torch.nn.Module`` as an sdk :class:`~sdk.interfaces.Encoder`.

``sdk.encoder(module, out_dim=None, input_shape=None, features=None, output=None)`` wraps a
module whose forward maps a batch ``x`` to embeddings ``[B, D]`` (a torchvision or timm model,
a Hugging Face ``transformers`` model with an ``output`` selector, or a plain module):

* ``out_dim``: given, or inferred by one dry forward on a batch of two inputs of
  ``input_shape`` (the per-sample shape, without the batch dimension), without gradients and in
  eval mode (every submodule's mode is restored after, so no batch-norm statistic moves);
* ``output``: which part of a module's output is the embedding: an index into a tuple or
  list, a key of a dict (or of a ``transformers`` ``ModelOutput``), or a function of the output
  (``lambda out: out.last_hidden_state[:, 0]``); a module returning anything but a tensor
  ``[B, D]`` without it is refused with a message naming what it returned;
* ``features``: the name of a submodule (``"avgpool"`` of a torchvision ResNet,
  ``"encoder.layer.11"``, as :meth:`torch.nn.Module.named_modules` names it) whose output,
  flattened to ``[B, F]``, is :meth:`features`, so objectives that need
  ``Views.extras["features"]`` train on it. It is read by a forward hook during the same forward
  that gives the embedding: ``features(x)`` right after ``encoder(x)`` returns that forward's
  features (same dropout, no second forward; as the Trainer calls them); on another input, or
  after a change of mode, it runs the module again.

The wrapped module is the submodule ``module``: its ``state_dict`` keys are the module's
prefixed with ``module.``, and ``torch.compile``, ``DistributedDataParallel`` and the
Trainer's teachers (which deep-copy the encoder) see an ordinary module.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sdk.errors import ConfigError, ShapeError
from sdk.interfaces import Encoder

Output = int | str | Callable[[Any], Tensor] | None


def _describe(out: Any) -> str:
    if isinstance(out, Tensor):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


class ModuleEncoder(Encoder):
    """An ``nn.Module`` as an Encoder: ``forward(x) = select(module(x))``, checked to be
    ``[B, out_dim]``; :meth:`features` is the flattened output of the submodule ``features``
    (see :mod:`sdk.backbone`)."""

    def __init__(self, module: nn.Module, out_dim: int | None = None,
                 input_shape: Sequence[int] | None = None, features: str | None = None,
                 output: Output = None):
        super().__init__()
        name = type(module).__name__
        self._label = f"sdk.encoder({name})"
        if not isinstance(module, nn.Module):
            raise ConfigError(f"sdk.encoder: module must be a torch.nn.Module, got {name}")
        if output is not None and not (isinstance(output, (int, str)) or callable(output)):
            raise ConfigError(f"{self._label}: output must be an index, a key or a function of the "
                              f"module's output, got {type(output).__name__}")
        if out_dim is not None and (isinstance(out_dim, bool) or not isinstance(out_dim, int)
                                    or out_dim < 1):
            raise ConfigError(f"{self._label}: out_dim must be a positive int, got {out_dim!r}")
        if input_shape is not None:
            if isinstance(input_shape, int):
                input_shape = (input_shape,)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                       for s in input_shape):
                raise ConfigError(f"{self._label}: input_shape must be positive ints (one sample's "
                                  f"shape, without the batch dimension), got {input_shape!r}")
            input_shape = tuple(input_shape)
        if out_dim is None and input_shape is None:
            raise ConfigError(f"{self._label}: give out_dim, or input_shape (one sample's shape) "
                              "to infer it by a dry forward")
        self.module = module
        self.output = output
        self.input_shape = input_shape
        self.features_name = features
        self._captured: Tensor | None = None
        self._last: tuple[Any, ...] | None = None  # (features, weakref to x, _key(x))
        if features is not None:
            submodules = dict(module.named_modules())
            submodules.pop("", None)
            if features not in submodules:
                close = difflib.get_close_matches(features, list(submodules), n=3, cutoff=0.4)
                hint = (f" Did you mean {', '.join(repr(c) for c in close)}?" if close
                        else f" Submodules: {', '.join(list(submodules)[:20]) or 'none'}")
                raise ConfigError(f"{self._label}: features: no submodule named {features!r}.{hint}")
            submodules[features].register_forward_hook(self._capture)
        self.out_dim = None  # type: ignore[assignment]  # the dry forward's output unchecked
        self.features_dim: int | None = None
        if input_shape is not None:
            z, h = self._dry_forward(input_shape)
            if out_dim is not None and z.shape[1] != out_dim:
                raise ConfigError(f"{self._label}: out_dim={out_dim} but the module gives "
                                  f"{list(z.shape)} on an input of shape [2, *{list(input_shape)}]")
            self.out_dim = int(z.shape[1])
            self.features_dim = None if h is None else int(h.shape[1])
        else:
            self.out_dim = out_dim

    def _capture(self, submodule: nn.Module, args: Any, out: Any) -> None:
        self._captured = out

    def _dry_forward(self, input_shape: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
        param = next(iter(self.module.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        modes = [(m, m.training) for m in self.module.modules()]
        x = torch.zeros(2, *input_shape, device=device, dtype=dtype)
        try:
            self.module.eval()
            with torch.no_grad():
                try:
                    out = self.module(x)
                except Exception as exc:
                    raise ConfigError(f"{self._label}: the dry forward on an input of shape "
                                      f"{list(x.shape)} (input_shape={list(input_shape)}) failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
                z = self._select(out, batch=2)
                h = self._take_features(batch=2)
        finally:
            for m, training in modes:
                m.training = training
        return z, h

    def _select(self, out: Any, batch: int) -> Tensor:
        sel = self.output
        if sel is not None:
            try:
                out = sel(out) if callable(sel) else out[sel]
            except (IndexError, KeyError, TypeError, AttributeError) as exc:
                raise ShapeError(f"{self._label}: output={sel!r} does not select from the module's "
                                 f"output, {_describe(out)} ({type(exc).__name__}: {exc})") from exc
        if not isinstance(out, Tensor):
            hint = (" (pick one with output=INDEX, output=KEY or output=FUNCTION)"
                    if isinstance(out, (tuple, list, Mapping)) or hasattr(out, "keys") else "")
            raise ShapeError(f"{self._label}: the module returned {_describe(out)}, not a tensor "
                             f"[B, D]{hint}")
        if out.dim() != 2 or out.shape[0] != batch or (self.out_dim is not None
                                                        and out.shape[1] != self.out_dim):
            dim = self.out_dim if self.out_dim is not None else "D"
            raise ShapeError(f"{self._label}: the embedding must be [B, out_dim] = [{batch}, {dim}],"
                             f" got {list(out.shape)} (pool or flatten it in the module, or pass "
                             "output=FUNCTION)")
        return out

    def _take_features(self, batch: int) -> Tensor | None:
        h, self._captured = self._captured, None
        if self.features_name is None:
            return None
        if not isinstance(h, Tensor):
            raise ShapeError(f"{self._label}: features: submodule {self.features_name!r} "
                             + ("did not run in the forward" if h is None
                                else f"returned {_describe(h)}, not a tensor"))
        if h.dim() < 2 or h.shape[0] != batch:
            raise ShapeError(f"{self._label}: features: submodule {self.features_name!r} returned "
                             f"{list(h.shape)}, not a batch of {batch} [B, ...]")
        return h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None
        if batch is None:
            raise ShapeError(f"{self._label}: x must be a batch tensor [B, ...], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        z = self._select(self.module(x), batch)
        h = self._take_features(batch)
        self._last = None if h is None else (h, weakref.ref(x), *self._key(x))
        return z

    def _key(self, x: Tensor) -> tuple[int, bool, bool]:
        return x._version, self.training, torch.is_grad_enabled()

    def features(self, x: Tensor) -> Tensor:
        """The flattened output of submodule ``features`` on ``x``: that of the last forward
        when it ran on this very tensor, unchanged since, in the same mode (training or not,
        gradients enabled or not), else of a new forward; without ``features``: the embedding."""
        if self.features_name is None:
            return self(x)
        last, self._last = self._last, None
        if last is not None and last[1]() is x and last[2:] == self._key(x):
            return last[0]
        self(x)
        last, self._last = self._last, None
        return last[0]

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``copy.deepcopy``, pickling) leave out the last forward's features."""
        state = self.__dict__.copy()
        state["_captured"] = state["_last"] = None
        return state

    def extra_repr(self) -> str:
        extra = f", features={self.features_name!r}" if self.features_name else ""
        return f"out_dim={self.out_dim}{extra}"


def encoder(module: nn.Module, out_dim: int | None = None, input_shape: Sequence[int] | None = None,
            features: str | None = None, output: Output = None) -> Encoder:
    """``module`` as an sdk Encoder (:class:`ModuleEncoder`; see :mod:`sdk.backbone`). An sdk
    Encoder given without any option is returned as it is."""
    if isinstance(module, Encoder) and (out_dim, input_shape, features, output) == (None,) * 4:
        return module
    return ModuleEncoder(module, out_dim=out_dim, input_shape=input_shape, features=features,
                         output=output)
