"""Shared machinery of contrastive objectives: one masked InfoNCE.

Anchors are compared with candidates through a similarity matrix ``[A, N]``; boolean masks
(from a :class:`~sdk.interfaces.Sampler`) say which pairs are positives and negatives, and
optional pair weights scale them. For anchor ``i`` with positives ``P_i`` and denominator set
``D_i`` (negatives, plus positives unless decoupled), with logits ``s = sim / tau``:

    l_i = log sum_{j in D_i} w_ij exp(s_ij)  -  sum_{p in P_i} w_ip s_ip / sum_{p in P_i} w_ip

which is NT-Xent for one positive and SupCon (L_out) for several. Never builds ``[A, N, D]``;
masked entries are filled with a large finite negative, so no ``-inf`` arithmetic makes NaN
gradients; anchors without a positive are excluded from the mean.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from sdk.distributed import gather_no_grad, gather_with_grad, rank, world_size
from sdk.errors import ShapeError
from sdk.types import Batch, Pairs, Views


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def masked_logsumexp(logits: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """``log sum_j mask_ij * w_ij * exp(logits_ij)`` over the last dimension (finite when empty)."""
    x = logits.masked_fill(~mask, _neg(logits.dtype))
    if weight is not None:
        x = x + weight.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).log()
    return torch.logsumexp(x, dim=-1)


def info_nce(logits: Tensor, positive: Tensor, negative: Tensor, *, weight: Tensor | None = None,
             positive_in_denominator: bool = True,
             extra_negative_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor masked InfoNCE (see module docstring) and the mask of anchors with a positive.

    ``logits`` [A, N] are already divided by the temperature; ``extra_negative_logits`` [A, M]
    are further negatives of weight 1 (synthetic negatives). Returns ``(loss [A], valid [A])``
    with ``loss`` zero where ``valid`` is false.
    """
    if positive.shape != logits.shape or negative.shape != logits.shape:
        raise ShapeError(f"info_nce: masks {list(positive.shape)}/{list(negative.shape)} must match "
                         f"logits {list(logits.shape)}")
    logits = logits.float()
    denominator = negative | positive if positive_in_denominator else negative
    log_den = masked_logsumexp(logits, denominator, weight)
    if extra_negative_logits is not None:
        log_den = torch.logaddexp(log_den, torch.logsumexp(extra_negative_logits.float(), dim=-1))
    pos_w = positive.to(logits.dtype) if weight is None else positive * weight.to(logits.dtype)
    n_pos = pos_w.sum(dim=-1)
    valid = n_pos > 0
    pos_term = (pos_w * logits).sum(dim=-1) / n_pos.clamp_min(torch.finfo(logits.dtype).tiny)
    return torch.where(valid, log_den - pos_term, torch.zeros_like(log_den)), valid


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over ``valid`` entries (no host sync; 0 when none are valid)."""
    return (values * valid).sum() / valid.sum().clamp_min(1)


@attrs.frozen(kw_only=True)
class Contrast:
    """Anchors of this process against the candidates of all processes.

    ``anchors`` [A, D] are this rank's rows of ``cat(views)`` (view-major), ``candidates``
    [N, D] every rank's (``N = A * world`` with ``gather``), ``self_col`` [A] the column of each
    anchor in ``candidates``; ``views``/``batch`` are the gathered records a Sampler sees.
    """

    anchors: Tensor
    candidates: Tensor
    self_col: Tensor
    views: Views
    batch: Batch
    n_views: int
    batch_size: int


def contrast(views: Views, batch: Batch, *, gather: bool = False, normalize: bool = True) -> Contrast:
    """Prepare anchors and candidates from ``views`` (optionally gathered across ranks)."""
    zs = [F.normalize(z, dim=-1) if normalize else z for z in views.embeddings]
    b, v = zs[0].shape[0], len(zs)
    anchors = torch.cat(zs)
    world = world_size() if gather else 1
    if world > 1:
        gathered = [gather_with_grad(z) for z in zs]
        g_batch = Batch(**{f: gather_no_grad(getattr(batch, f)) if getattr(batch, f) is not None
                           else None for f in ("targets", "index", "domain", "weight")})
        g_views = Views(embeddings=tuple(gathered))
        offset = rank() * b
    else:
        gathered, g_batch, g_views, offset = zs, batch, Views(embeddings=tuple(zs)), 0
    candidates = torch.cat(gathered)
    local = torch.arange(b, device=anchors.device) + offset
    self_col = torch.cat([local + k * b * world for k in range(v)])
    return Contrast(anchors=anchors, candidates=candidates, self_col=self_col, views=g_views,
                    batch=g_batch, n_views=v, batch_size=b)


def same_index_masks(c: Contrast) -> tuple[Tensor, Tensor]:
    """Positives: other views of the same sample; negatives: views of every other sample."""
    n = c.candidates.shape[0]
    sample = torch.arange(n, device=c.anchors.device) % (n // c.n_views)
    same = sample[c.self_col][:, None] == sample[None, :]
    not_self = _not_self(c)
    return same & not_self, ~same


def _not_self(c: Contrast) -> Tensor:
    cols = torch.arange(c.candidates.shape[0], device=c.anchors.device)
    return cols[None, :] != c.self_col[:, None]


def sampler_pairs(c: Contrast, sampler) -> Pairs:
    """Ask ``sampler`` for pairs over the gathered views and keep this rank's anchor rows.

    Self-pairs are never positives or negatives, whatever the sampler says.
    """
    pairs = sampler.pairs(c.views, c.batch)
    n = c.candidates.shape[0]
    if pairs.positive.shape != (n, n):
        raise ShapeError(f"sampler {type(sampler).__name__} returned masks {list(pairs.positive.shape)}; "
                         f"expected [{n}, {n}] over the concatenated views")
    not_self = _not_self(c)
    rows = c.self_col
    extra = pairs.extra_negatives[rows] if pairs.extra_negatives is not None else None
    return Pairs(positive=pairs.positive[rows] & not_self, negative=pairs.negative[rows] & not_self,
                 weight=pairs.weight[rows] if pairs.weight is not None else None,
                 extra_negatives=extra)


def per_sample(loss: Tensor, c: Contrast) -> Tensor:
    """Average the per-anchor losses [V*B] into per-sample losses [B]."""
    return loss.view(c.n_views, c.batch_size).mean(dim=0)
