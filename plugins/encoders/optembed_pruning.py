"""OptEmbed: an embedding table whose rows are pruned by learned per-field thresholds.

Lyu, Tang, Zhu, Guo, Zhang, Tang, He and Yuan, "OptEmbed: Learning Optimal Embedding Table for
Click-through Rate Prediction", CIKM 2022, arXiv:2208.04482 (authors' code: fuyuanlyu/OptEmbed).

Encoder ``optembed_pruning``: ``x [B, F]`` holds one id per categorical field; ``e = E[id]``
``[B, F, d]`` and, with a threshold ``t_f`` per field (initialised 0),

    m = H(||e||_p - t_f),   out = flatten(m * e)                           [B, F d]

``H`` the step function, back-propagated with the authors' long-tail straight-through estimator
``H'(u) = 2 - 4|u|`` for ``|u| <= 0.4``, ``0.4`` for ``0.4 < |u| <= 1``, ``0`` beyond. In training
(the supernet) every (sample, field) also keeps only its first ``d_f`` columns,
``d_f ~ U{1..d}``; with ``embedding_dims`` set (the searched dims, for the retraining) those are
fixed. The threshold regulariser ``alpha * sum_f exp(-t_f)`` (pushing thresholds up, i.e. rows
out) is added to the training loss after every step's objective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import Tensor, nn

from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Encoder
from sdk.types import Loss


class LongTailStep(torch.autograd.Function):
    """``1[u > 0]`` forward; backward ``grad * H'(u)`` (module docstring)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor) -> Tensor:
        ctx.save_for_backward(u)
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (u,) = ctx.saved_tensors
        a = u.abs()
        slope = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, 0.4, 0.0))
        return grad * slope.to(grad.dtype)


class OptEmbedPruning(Encoder):
    """The pruned embedding table above: ``field_dims`` ids per field, rows of width ``dim``;
    ``out_dim = len(field_dims) * dim``. ``x``: integer ``[B, F]``, field ``f``'s id in
    ``[0, field_dims[f])`` (checked on CPU tensors; on an accelerator that check would cost a
    host sync). ``embedding_dims``: the per-field widths found by :meth:`search` (None: the
    supernet, random widths in training, all ``dim`` columns in evaluation)."""

    takes_ids = True

    def __init__(self, field_dims: tuple[int, ...] | list[int] = (10,) * 8,
                 dim: Annotated[int, Ge(1)] = 16, alpha: Annotated[float, Ge(0)] = 3e-4,
                 norm: Annotated[int, Interval(ge=1, le=2)] = 1,
                 embedding_dims: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        sizes = [int(n) for n in field_dims]
        if not sizes or any(n < 1 for n in sizes):
            raise ConfigError(f"optembed_pruning: field_dims must be >= 1 ids per field, got "
                              f"{list(field_dims)}", param="field_dims")
        self.field_dims, self.dim, self.alpha, self.norm = tuple(sizes), dim, alpha, norm
        self.num_fields = len(sizes)
        self.in_dim, self.out_dim = None, self.num_fields * dim
        self.embedding = nn.Parameter(torch.empty(sum(sizes), dim))
        nn.init.xavier_uniform_(self.embedding)      # the authors' initialisation
        self.threshold = nn.Parameter(torch.zeros(self.num_fields))
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]]).cumsum(0), persistent=False)
        self.register_buffer("columns", torch.arange(dim), persistent=False)
        self.embedding_dims: tuple[int, ...] | None = None
        self.set_dims(embedding_dims)

    def set_dims(self, dims: Sequence[int] | None) -> None:
        """Fix each field's embedding width (``1..dim``), or back to the supernet (None)."""
        if dims is not None:
            dims = tuple(int(d) for d in dims)
            if len(dims) != self.num_fields or not all(1 <= d <= self.dim for d in dims):
                raise ConfigError(f"optembed_pruning: embedding_dims must give {self.num_fields} "
                                  f"widths in 1..{self.dim}, got {list(dims)}",
                                  param="embedding_dims")
        self.embedding_dims = dims

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.stack([torch.randint(0, n, (batch_size,), generator=generator)
                            for n in self.field_dims], 1)

    def row_mask(self, e: Tensor) -> Tensor:
        """``H(||e||_p - t_f)`` for looked-up rows ``e [B, F, d]``, ``[B, F, 1]``."""
        size = e.norm(p=self.norm, dim=-1) - self.threshold.to(e.dtype)
        return LongTailStep.apply(size)[..., None]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_fields or x.is_floating_point() or \
                x.dtype == torch.bool:
            raise ShapeError(f"encoder 'optembed_pruning': x must be integer ids [B, "
                             f"{self.num_fields}] (one per field), got {x.dtype} {list(x.shape)}")
        if x.device.type == "cpu" and x.numel() and (
                (x < 0).any() or (x >= torch.tensor(self.field_dims)).any()):
            raise ShapeError(f"encoder 'optembed_pruning': x[:, f] must lie in [0, field_dims[f]) "
                             f"with field_dims={list(self.field_dims)}")
        e = self.embedding[x + self.offsets]                                      # [B, F, d]
        out = self.row_mask(e) * e
        if self.embedding_dims is not None:
            width = torch.tensor(self.embedding_dims, device=x.device)[None, :, None]
            out = out * (self.columns < width).to(out.dtype)
        elif self.training:
            width = torch.randint(1, self.dim + 1, (x.shape[0], self.num_fields, 1),
                                  device=x.device)
            out = out * (self.columns < width).to(out.dtype)
        return out.flatten(1)

    def penalty(self) -> Tensor:
        """``alpha * sum_f exp(-t_f)``."""
        return self.alpha * torch.exp(-self.threshold).sum()

    @torch.no_grad()
    def kept_rows(self) -> Tensor:
        """Which table rows survive, bool ``[sum(field_dims)]``."""
        t = torch.repeat_interleave(self.threshold, torch.tensor(self.field_dims,
                                                                 device=self.threshold.device))
        return self.embedding.norm(p=self.norm, dim=-1) > t

    def after_loss(self, state: Any) -> None:
        loss, reg = state.loss, self.penalty()
        logs = dict(loss.logs)
        logs["optembed/penalty"] = reg.detach()
        state.loss = Loss(value=loss.value + reg.to(loss.value.dtype), per_sample=loss.per_sample,
                          logs=logs)

    @torch.no_grad()
    def search(self, score: Callable[[OptEmbedPruning], float], trials: int = 20,
               generator: torch.Generator | None = None) -> tuple[int, ...]:
        """Random search over per-field widths (``score(self)`` evaluated with each candidate
        set, higher is better, e.g. a validation AUC); the best is set and returned. The full
        width is the first candidate."""
        best, best_score = (self.dim,) * self.num_fields, None
        for i in range(trials):
            dims = best if i == 0 else tuple(
                torch.randint(1, self.dim + 1, (self.num_fields,), generator=generator).tolist())
            self.set_dims(dims)
            value = float(score(self))
            if best_score is None or value > best_score:
                best, best_score = dims, value
        self.set_dims(best)
        return best


CARD = Card(
    name="optembed_pruning", kind="encoder",
    title="OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction",
    paper="arXiv:2208.04482",
    summary="Categorical-field embedding table with learned per-field thresholds that prune "
            "whole rows (long-tail straight-through step), a supernet over per-field widths and "
            "the threshold regulariser alpha * sum exp(-t).",
    formula="out = H(||E[id]||_1 - t_f) * E[id] (first d_f columns, d_f ~ U{1..d} in training); "
            "L += alpha sum_f exp(-t_f), alpha = 3e-4; H'(u) = 2-4|u| (|u|<=.4), .4 (<=1), 0",
    left_out="The evolutionary search over widths (a random search stands in: search()), "
             "Criteo/Avazu/KDD12 and the CTR base models (DeepFM, DCN, IPNN...): the table feeds "
             "any head. Feature-level thresholds, the OOV-row variant and the authors' "
             "'all2' normalised supernet are not here. The regulariser is added in training "
             "(after_loss); calling the encoder outside the Trainer, add penalty() yourself.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(OptEmbedPruning, card=CARD)
