"""Shared machinery of contrastive objectives: one masked InfoNCE.

Anchors are compared with candidates through a similarity matrix ``[A, N]``; boolean masks
(from a :class:`~sdk.interfaces.Sampler`) say which pairs are positives and negatives, and
optional pair weights scale them. For anchor ``i`` with positives ``P_i`` and denominator set
``D_i`` (negatives, plus positives unless decoupled), with logits ``s = sim / tau``:

    l_i = log sum_{j in D_i} w_ij exp(s_ij)  -  sum_{p in P_i} w_ip s_ip / sum_{p in P_i} w_ip

which is NT-Xent for one positive and SupCon (L_out) for several. Never builds ``[A, N, D]``;
masked entries are filled with a large finite negative, so no ``-inf`` arithmetic makes NaN
gradients; anchors without a positive are excluded from the mean.

Candidates beyond the batch join the denominator as *extra negatives* (:func:`extra_negatives`):
synthetic ones from a Sampler (``Pairs.extra_negatives`` vectors or ``Pairs.extra_negative_sims``
similarities) and a shared memory published in ``Views.extras`` by a queue or memory-bank
teacher (:data:`sdk.keys.NEGATIVES` [M, D], optional :data:`~sdk.keys.NEGATIVES_MASK` [M] of
valid entries and :data:`~sdk.keys.NEGATIVES_INDEX` [M] of dataset indices: an anchor never
counts its own sample's entries).
With the default pairs (other views of the sample are positives), :func:`instance_info_nce`
computes the same loss without building any mask.
"""

from __future__ import annotations

from typing import Annotated

import attrs
import torch
import torch.nn.functional as F
from annotated_types import Gt
from torch import Tensor

from sdk.distributed import (
    Gather,
    gather_no_grad,
    gather_with_grad,
    rank,
    resolve_gather,
    sum_over_ranks,
    world_size,
)
from sdk.errors import ShapeError
from sdk.interfaces import Input, Objective, Sampler
from sdk.keys import NEGATIVES as NEGATIVES  # re-exported: the memory entries' keys
from sdk.keys import NEGATIVES_INDEX as NEGATIVES_INDEX
from sdk.keys import NEGATIVES_MASK as NEGATIVES_MASK
from sdk.types import Batch, Loss, Pairs, Views


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def masked_logsumexp(logits: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """``log sum_j mask_ij * w_ij * exp(logits_ij)`` over the last dimension (finite when empty)."""
    x = torch.where(mask, logits, _neg(logits.dtype))
    if weight is not None:
        x = x + weight.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).log()
    return torch.logsumexp(x, dim=-1)


def _add_extra(log_den: Tensor, extra_logits: Tensor | None, extra_mask: Tensor | None) -> Tensor:
    if extra_logits is None:
        return log_den
    extra_logits = extra_logits.float()
    extra = (torch.logsumexp(extra_logits, dim=-1) if extra_mask is None
             else masked_logsumexp(extra_logits, extra_mask))
    return torch.logaddexp(log_den, extra)


def info_nce(logits: Tensor, positive: Tensor, negative: Tensor, *, weight: Tensor | None = None,
             positive_in_denominator: bool = True,
             extra_negative_logits: Tensor | None = None,
             extra_negative_mask: Tensor | None = None,
             positive_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-anchor masked InfoNCE (see module docstring) and the mask of anchors with a positive.

    ``logits`` [A, N] are already divided by the temperature; ``extra_negative_logits`` [A, M]
    are further negatives of weight 1 (synthetic or memory negatives), of which only those
    where ``extra_negative_mask`` [A, M] is true count; ``positive_scale`` [A, N] multiplies each
    positive's logit in the positive term (a constant such as DCLW's weight). Returns
    ``(loss [A], valid [A])`` with ``loss`` zero where ``valid`` is false.
    """
    if positive.shape != logits.shape or negative.shape != logits.shape:
        raise ShapeError(f"info_nce: masks {list(positive.shape)}/{list(negative.shape)} must match "
                         f"logits {list(logits.shape)}")
    logits = logits.float()
    denominator = negative | positive if positive_in_denominator else negative
    log_den = _add_extra(masked_logsumexp(logits, denominator, weight), extra_negative_logits,
                         extra_negative_mask)
    pos_w = positive.to(logits.dtype) if weight is None else positive * weight.to(logits.dtype)
    n_pos = pos_w.sum(dim=-1)
    valid = n_pos > 0
    scaled = pos_w if positive_scale is None else pos_w * positive_scale.to(logits.dtype)
    pos_term = (scaled * logits).sum(dim=-1) / n_pos.clamp_min(torch.finfo(logits.dtype).tiny)
    return torch.where(valid, log_den - pos_term, torch.zeros_like(log_den)), valid


class _InstanceLogDenominator(torch.autograd.Function):
    """``log sum_{n not excluded} exp(<a, c_n> / t)`` per anchor, with its gradient in closed form.

    Forward keeps one [A, N] tensor: the logits, turned in place into the softmax over the
    denominator (excluded entries exactly 0), which is all the backward needs:
    ``dL/dlogits = softmax * g``, then two matrix products. The excluded entries of row ``r``
    are ``exclude[r]`` (its own column and, for decoupled losses, its positives).
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, candidates: Tensor, exclude: Tensor, temperature: float) -> Tensor:
        logits = (anchors @ candidates.T).float()
        logits.mul_(1.0 / temperature)
        rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
        logits[rows, exclude] = _neg(logits.dtype)
        peak = logits.amax(dim=1, keepdim=True)
        softmax = logits.sub_(peak).exp_()
        softmax[rows, exclude] = 0.0  # exact zero even where a row has no other entry
        total = softmax.sum(dim=1, keepdim=True)
        softmax.div_(total.clamp_min(torch.finfo(softmax.dtype).tiny))
        ctx.save_for_backward(anchors, candidates, softmax)
        ctx.temperature = temperature
        return (peak + total.log()).squeeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        anchors, candidates, softmax = ctx.saved_tensors
        g = (softmax * (grad / ctx.temperature)[:, None]).to(anchors.dtype)
        grad_anchors = g @ candidates if ctx.needs_input_grad[0] else None
        grad_candidates = g.T @ anchors if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_candidates, None, None


def instance_info_nce(c: Contrast, temperature: float, *, positive_in_denominator: bool = True,
                      extra_negative_logits: Tensor | None = None,
                      extra_negative_mask: Tensor | None = None,
                      positive_scale: Tensor | None = None) -> Tensor:
    """:func:`info_nce` with the default pairs (positives: the other views of the anchor's sample;
    negatives: every view of every other sample), computed without masks.

    The in-batch denominator is one fused operation whose only ``[A, N]`` tensor is the
    softmax it keeps for the backward (excluded entries: the anchor itself, and its positives
    when ``positive_in_denominator`` is false); the positive logits come from row-wise dot
    products. ``positive_scale`` is [A, V-1], one factor per positive column of
    :func:`positive_columns`. Returns the per-anchor loss [A] (every anchor has a positive).
    """
    pos_cols = positive_columns(c)
    exclude = c.self_col[:, None] if positive_in_denominator else torch.cat(
        [c.self_col[:, None], pos_cols], dim=1)
    log_den = _InstanceLogDenominator.apply(c.anchors, c.candidates, exclude, temperature)
    log_den = _add_extra(log_den, extra_negative_logits, extra_negative_mask)
    pos = torch.einsum("ad,akd->ak", c.anchors, c.candidates[pos_cols]).float() / temperature
    if positive_scale is not None:
        pos = pos * positive_scale.to(pos.dtype)
    return log_den - pos.mean(dim=-1)


def masked_mean(values: Tensor, valid: Tensor, c: Contrast | None = None) -> Tensor:
    """Mean of ``values`` over ``valid`` entries (no host sync; 0 when none are valid).

    With ``c`` gathered across ranks, the count is every rank's (times the world size, which
    the ranks' mean divides out): the ranks' mean is then the mean over the global batch's
    valid entries even when the ranks hold different numbers of them."""
    count = valid.sum()
    if c is not None and c.world > 1:
        count = sum_over_ranks(count) / c.world
    return (values * valid).sum() / count.clamp_min(1)


@attrs.frozen(kw_only=True)
class Contrast:
    """Anchors of this process against the candidates of all processes.

    ``anchors`` [A, D] are this rank's rows of ``cat(views)`` (view-major), ``candidates``
    [N, D] every rank's (``N = A * world`` with ``gather``), ``self_col`` [A] the column of each
    anchor in ``candidates``; ``views``/``batch`` are the gathered records a Sampler sees;
    ``world`` the number of ranks gathered (1: none).
    """

    anchors: Tensor
    candidates: Tensor
    self_col: Tensor
    views: Views
    batch: Batch
    n_views: int
    batch_size: int
    world: int = 1


def contrast(views: Views, batch: Batch, *, gather: Gather = False, normalize: bool = True) -> Contrast:
    """Prepare anchors and candidates from ``views``, gathered across ranks when ``gather``
    resolves to on (:func:`sdk.distributed.resolve_gather`: ``"auto"`` under DDP)."""
    zs = [F.normalize(z, dim=-1) if normalize else z for z in views.embeddings]
    b, v = zs[0].shape[0], len(zs)
    anchors = torch.cat(zs)
    world = world_size() if resolve_gather(gather) else 1
    if world > 1:
        gathered = [gather_with_grad(z) for z in zs]
        g_batch = Batch(**{f: gather_no_grad(getattr(batch, f)) if getattr(batch, f) is not None
                           else None for f in ("targets", "index", "domain", "weight")})
        g_views = Views(embeddings=tuple(gathered), extras=views.extras)
        offset = rank() * b
    else:
        gathered, g_batch, offset = zs, batch, 0
        g_views = Views(embeddings=tuple(zs), extras=views.extras)
    candidates = torch.cat(gathered)
    local = torch.arange(b, device=anchors.device) + offset
    self_col = torch.cat([local + k * b * world for k in range(v)])
    return Contrast(anchors=anchors, candidates=candidates, self_col=self_col, views=g_views,
                    batch=g_batch, n_views=v, batch_size=b, world=world)


def require_negatives(c: Contrast, objective: str) -> None:
    """Raise :class:`~sdk.errors.ShapeError` naming ``objective`` when the (gathered) batch has a
    single sample: its views are then each other's positives and nothing is a negative."""
    if c.candidates.shape[0] // c.n_views < 2:
        raise ShapeError(f"objective {objective!r} needs negatives: a batch of at least 2 samples "
                         f"(over all ranks when gathering), got {c.candidates.shape[0] // c.n_views}")


def same_index_masks(c: Contrast) -> tuple[Tensor, Tensor]:
    """Positives: other views of the same sample; negatives: views of every other sample."""
    n = c.candidates.shape[0]
    sample = torch.arange(n, device=c.anchors.device) % (n // c.n_views)
    same = sample[c.self_col][:, None] == sample[None, :]
    not_self = _not_self(c)
    return same & not_self, ~same


def positive_columns(c: Contrast) -> Tensor:
    """Columns [A, V-1] of the other views of each anchor's sample (the default positives)."""
    per_view = c.candidates.shape[0] // c.n_views
    view, col = c.self_col // per_view, c.self_col % per_view
    others = [((view + k) % c.n_views) * per_view + col for k in range(1, c.n_views)]
    return torch.stack(others, dim=1)


def anchor_index(c: Contrast) -> Tensor | None:
    """Dataset index (``Batch.index``) of every anchor, or None when the batch has none."""
    if c.batch.index is None:
        return None
    return c.batch.index[c.self_col % (c.candidates.shape[0] // c.n_views)]


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

    def own(t: Tensor | None) -> Tensor | None:
        return t[rows] if t is not None else None

    return Pairs(positive=pairs.positive[rows] & not_self, negative=pairs.negative[rows] & not_self,
                 weight=own(pairs.weight), extra_negatives=own(pairs.extra_negatives),
                 extra_negative_mask=own(pairs.extra_negative_mask),
                 extra_negative_sims=own(pairs.extra_negative_sims))


def memory_mask(extras, index: Tensor | None, rows: int) -> Tensor | None:
    """Which memory entries (``extras["negatives"]``) are negatives of each of ``rows`` anchors
    with dataset indices ``index``: valid entries not of the anchor's own sample; None if all."""
    valid, owner = extras.get(NEGATIVES_MASK), extras.get(NEGATIVES_INDEX)
    mask = None if valid is None else valid[None, :].expand(rows, -1)
    if owner is not None and index is not None:
        other = owner[None, :] != index[:, None]
        mask = other if mask is None else mask & other
    return mask


def extra_negatives(c: Contrast, pairs: Pairs | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Cosine similarities [A, M] of each anchor with its extra negatives and their mask [A, M]
    (None when every entry counts): the Sampler's synthetic negatives (``pairs``, already
    restricted to this rank's anchors: vectors, then similarities, masked by
    ``pairs.extra_negative_mask`` as :class:`~sdk.types.Pairs` documents) then the memory
    in ``Views.extras["negatives"]`` (detached; entries are taken as given). ``(None, None)``
    when there are none."""
    sims: list[Tensor] = []
    masks: list[Tensor | None] = []
    if pairs is not None and pairs.extra_negatives is not None:
        sims.append(torch.einsum("ad,amd->am", c.anchors, pairs.extra_negatives.to(c.anchors.dtype)))
        masks.append(pairs.extra_negative_mask)
    if pairs is not None and pairs.extra_negative_sims is not None:
        sims.append(pairs.extra_negative_sims)
        masks.append(pairs.extra_negative_mask if pairs.extra_negatives is None else None)
    memory = c.views.extras.get(NEGATIVES)
    if memory is not None:
        sims.append(c.anchors @ memory.detach().to(c.anchors.dtype).T)
        masks.append(memory_mask(c.views.extras, anchor_index(c), c.anchors.shape[0]))
    if not sims:
        return None, None
    if all(m is None for m in masks):
        return (sims[0] if len(sims) == 1 else torch.cat(sims, dim=1)), None
    full = [torch.ones_like(s, dtype=torch.bool) if m is None else m for s, m in zip(sims, masks)]
    return torch.cat(sims, dim=1), torch.cat(full, dim=1)


def per_sample(loss: Tensor, c: Contrast) -> Tensor:
    """Average the per-anchor losses [V*B] into per-sample losses [B]."""
    return loss.view(c.n_views, c.batch_size).mean(dim=0)


def sample_ids(views: Views) -> torch.Tensor:
    """Sample id of every row of ``cat(views.embeddings)`` (view-major)."""
    b = views.batch_size
    device = views.embeddings[0].device
    return torch.arange(b, device=device).repeat(views.n_views)


# the NT-Xent objective (SimCLR), shared by nt_xent and the objectives that extend it --------


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, *more_views: torch.Tensor,
                 temperature: float = 0.5, sampler: Sampler | None = None,
                 batch: Batch | None = None, gather: Gather = "auto") -> torch.Tensor:
    """Mean NT-Xent over all anchors of all views; see :class:`NTXent`."""
    return NTXent(temperature=temperature, sampler=sampler, gather=gather)(
        Views(embeddings=(z1, z2, *more_views)), batch).value


class NTXent(Objective):
    """For anchor i (every row of every view), positives P(i) and all other rows A(i)::

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a in A(i)} exp(s_ia / t) )

    with cosine similarity s. Default positives: the other views of the same sample (SimCLR);
    a Sampler (e.g. ``label_positives``, giving SupCon) can choose positives, negatives and
    pair weights, and add synthetic negatives; a queue or memory-bank teacher's entries in
    ``Views.extras["negatives"]`` join every anchor's denominator. ``gather`` ("auto": under
    DDP) contrasts against the embeddings of every rank.
    """

    requires = {"views": 2}
    accepts_sampler = True
    consumes = frozenset({Input.PAIRS, Input.PAIR_WEIGHTS, Input.EXTRA_NEGATIVES})
    batch_coupled = True

    def __init__(self, temperature: Annotated[float, Gt(0)] = 0.5, sampler: Sampler | None = None,
                 gather: Gather = "auto"):
        super().__init__()
        self.temperature = temperature
        self.sampler = sampler
        self.gather = gather

    def forward(self, views: Views, batch: Batch) -> Loss:
        c = contrast(views, batch, gather=self.gather)
        pairs = None if self.sampler is None else sampler_pairs(c, self.sampler)
        extra, extra_mask = extra_negatives(c, pairs)
        extra = None if extra is None else extra / self.temperature
        if pairs is None:
            loss = instance_info_nce(c, self.temperature, extra_negative_logits=extra,
                                                 extra_negative_mask=extra_mask)
            return Loss(value=loss.mean(), per_sample=per_sample(loss, c))
        logits = c.anchors @ c.candidates.T / self.temperature
        loss, valid = info_nce(logits, pairs.positive, pairs.negative, weight=pairs.weight,
                                           extra_negative_logits=extra, extra_negative_mask=extra_mask)
        return Loss(value=masked_mean(loss, valid, c),
                    per_sample=per_sample(loss, c))


# two views from different encoders (CLIP's image and text) ---------------------------------


def cross_modal_info_nce(views: Views, batch: Batch, scale: Tensor, *, pair: tuple[int, int] = (0, 1),
                         label_smoothing: float = 0.0, gather: Gather = False) -> Tensor:
    """CLIP's symmetric InfoNCE between views ``a, b = pair`` (two modalities of one sample,
    encoded by different towers), per sample ``[B]``::

        l_i = 1/2 [ CE_eps(s * cos(a_i, b_.), i) + CE_eps(s * cos(b_i, a_.), i) ]

    with ``s`` the logit scale (1 / temperature, a tensor: it may be learned) and ``CE_eps`` the
    cross-entropy against the smoothed target ``(1 - eps) onehot(i) + eps / N`` over the ``N``
    candidates of the other modality (every rank's when ``gather`` is on; ``eps = 0``: CLIP).
    Only the cross-modal pairs count: a view is never contrasted with its own modality."""
    a, b = pair
    if not (0 <= a < views.n_views and 0 <= b < views.n_views) or a == b:
        raise ShapeError(f"cross_modal_info_nce: pair {tuple(pair)} must name two different views "
                         f"of the {views.n_views} given")
    c = contrast(Views(embeddings=(views.embeddings[a], views.embeddings[b]), extras=views.extras),
                 batch, gather=gather)
    n = c.candidates.shape[0] // 2  # candidates of one modality
    rows = c.self_col[:c.batch_size]  # each sample's column among its modality's candidates
    za, zb = c.anchors[:c.batch_size], c.anchors[c.batch_size:]
    s = scale.float()
    a_to_b = (za @ c.candidates[n:].T).float() * s
    b_to_a = (zb @ c.candidates[:n].T).float() * s
    return (F.cross_entropy(a_to_b, rows, reduction="none", label_smoothing=label_smoothing)
            + F.cross_entropy(b_to_a, rows, reduction="none", label_smoothing=label_smoothing)) / 2
