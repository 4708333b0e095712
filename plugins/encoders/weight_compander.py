"""Weight compander: every Linear/Conv weight of an encoder reparameterised through a compander.

Cakaj, Mehnert and Yang, "Weight Compander: A Simple Weight Reparameterization for
Regularization", IJCNN 2023, arXiv:2306.16993.

The trained parameter is ``v``; the layer uses ``w = f(v)`` with the mu-law compander

    f(v) = scale * sign(v) * log(1 + mu |v|) / log(1 + mu),

odd and increasing, with slope ``scale mu / log(1 + mu)`` (> 1) at 0 and slope falling as
``1 / |v|`` far out: small weights are pushed away from zero, large ones grow only
logarithmically. ``v`` starts at ``f^{-1}`` of the layer's initial weight, so wrapping does not
change the function a freshly built encoder computes.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sdk.card import Card
from sdk.context import FromData
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.layers import check_features, mlp_layers

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def compand(v: Tensor, mu: Tensor | float, scale: Tensor | float) -> Tensor:
    """``scale * sign(v) * log1p(mu |v|) / log1p(mu)`` (elementwise), written as
    ``v * h(|v|)`` with ``h(a) = log1p(mu a) / a``, ``h(0) = mu``, so that a weight at exactly
    zero gets its true slope ``scale mu / log1p(mu)`` (``sign`` and ``abs`` would give it none)."""
    mu = torch.as_tensor(mu, dtype=v.dtype, device=v.device)
    a = v.abs()
    safe = a.clamp_min(torch.finfo(v.dtype).tiny)
    h = torch.where(a > 0, torch.log1p(mu * safe) / safe, mu)
    return scale * v * h / torch.log1p(mu)


def expand(w: Tensor, mu: Tensor | float, scale: Tensor | float) -> Tensor:
    """The inverse of :func:`compand`: ``sign(w) * expm1(|w| log1p(mu) / scale) / mu``."""
    mu = torch.as_tensor(mu, dtype=w.dtype, device=w.device)
    return torch.sign(w) * torch.expm1(w.abs() * torch.log1p(mu) / scale) / mu


class Compander(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrisation ``v -> compand(v, mu, scale)``; with
    ``learn``, ``log mu`` and ``log scale`` are parameters of the layer (the paper's learned
    hyperparameters; the logs keep both positive), else fixed buffers."""

    def __init__(self, mu: float, scale: float, learn: bool):
        super().__init__()
        logs = torch.tensor([math.log(mu), math.log(scale)])
        if learn:
            self.log_mu, self.log_scale = nn.Parameter(logs[0].clone()), nn.Parameter(logs[1].clone())
        else:
            self.register_buffer("log_mu", logs[0].clone())
            self.register_buffer("log_scale", logs[1].clone())

    def forward(self, v: Tensor) -> Tensor:
        return compand(v, self.log_mu.exp().to(v.dtype), self.log_scale.exp().to(v.dtype))

    def right_inverse(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            return expand(w, self.log_mu.exp().to(w.dtype), self.log_scale.exp().to(w.dtype))


def apply_weight_compander(module: nn.Module, *, mu: float = 255.0, scale: float = 1.0,
                           learn: bool = False) -> nn.Module:
    """Reparameterise (in place) the ``weight`` of every Linear and Conv layer in ``module``
    as ``compand(v)``, ``v`` initialised to ``expand(weight)``; biases and normalisation layers
    are left as they are. Returns ``module``."""
    for name, value in (("mu", mu), ("scale", scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"weight_compander: {name} must be a number > 0, got {value!r}",
                              param=name)
    layers = [m for m in module.modules() if isinstance(m, _WEIGHTED)]
    if not layers:
        raise ConfigError(f"weight_compander: {type(module).__name__} has no Linear or Conv layer "
                          "whose weight could be reparameterised", param="backbone")
    for m in layers:
        if parametrize.is_parametrized(m, "weight"):
            raise ConfigError(f"weight_compander: a {type(m).__name__} weight of "
                              f"{type(module).__name__} is already parametrised (wrap it once)",
                              param="backbone")
    for m in layers:
        parametrize.register_parametrization(m, "weight", Compander(mu, scale, learn))
    return module


class WeightCompander(Encoder):
    """An encoder whose Linear/Conv weights are ``w = f(v)`` (see the module docstring).

    With ``backbone``, that encoder's layers are reparameterised in place and its ``forward``,
    ``features`` and ``out_dim`` are kept; without one, an MLP ``in_dim -> hidden_dims ->
    out_dim`` (batch norm, ReLU; input flattened, floating ``[B, in_dim]`` of the parameters'
    dtype) is built and reparameterised. ``learn``: learn ``mu`` and ``scale`` per layer."""

    def __init__(self, backbone: Encoder | None = None,
                 in_dim: Annotated[int, Ge(1), FromData("in_dim")] = 64,
                 hidden_dims: tuple[int, ...] | list[int] = (256,),
                 out_dim: Annotated[int, Ge(1)] = 128,
                 mu: Annotated[float, Gt(0)] = 255.0, scale: Annotated[float, Gt(0)] = 1.0,
                 learn: bool = False):
        super().__init__()
        self.backbone = backbone
        if backbone is None:
            self.in_dim, self.out_dim = in_dim, out_dim
            self.net = mlp_layers([in_dim, *hidden_dims, out_dim])
            apply_weight_compander(self.net, mu=mu, scale=scale, learn=learn)
        else:
            self.in_dim, self.out_dim = None, backbone.out_dim
            apply_weight_compander(backbone, mu=mu, scale=scale, learn=learn)

    def features(self, x: Tensor) -> Tensor:
        return self(x) if self.backbone is None else self.backbone.features(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone is not None:
            return self.backbone(x)
        if x.dim() < 2:
            raise ShapeError(f"encoder 'weight_compander': x must be a batch [B, ...] of "
                             f"{self.in_dim} features, got {list(x.shape)}")
        x = x.flatten(1)
        check_features("encoder 'weight_compander'", "x (flattened)", x, self.in_dim,
                       module=self.net, batch_norm=True)
        return self.net(x)


CARD = Card(
    name="weight_compander", kind="encoder",
    title="Weight Compander: A Simple Weight Reparameterization for Regularization",
    paper="arXiv:2306.16993",
    summary="Trains v and uses w = f(v) for every Linear/Conv weight, f a mu-law compander: "
            "large weights grow only logarithmically, small ones are pushed away from zero.",
    formula="w = scale * sign(v) * log(1 + mu|v|) / log(1 + mu); v_0 = f^{-1}(w_0)",
    left_out="The paper's text was not reachable here: the compander is the mu-law form (mu=255 "
             "as in G.711 telephony, scale=1), not checked against the paper's own function or "
             "defaults; the learned-hyperparameter variant learns log mu and log scale per layer, "
             "which may differ from the paper's parametrisation. No regularisation effect on "
             "digits is claimed or tested here.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(WeightCompander, card=CARD)
