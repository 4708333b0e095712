"""Sequence-model inputs, read and checked once for every language-model objective.

A causal language model (the ``causal_lm`` encoder, or any :class:`~sdk.interfaces.Encoder`
declaring ``sequence = True``) maps token ids ``[B, T]`` to next-token scores ``[B, T, V]``:
``logits[:, t]`` scores the token at position ``t + 1`` given the tokens up to ``t``. The
Trainer passes them to an objective that requires logits as ``Views.logits``; what the scores
are judged against is in ``Batch.extras``:

* :data:`sdk.keys.TOKEN_IDS`, long ``[B, T]``: the sequences (the same ids the model read);
* :data:`sdk.keys.TOKEN_MASK`, ``[B, T]`` bool or 0/1: which tokens count as targets (prompt
  and padding positions are 0; absent: every token). Token 0 never counts: nothing predicts it.
  A masked position never enters any loss, value or gradient;
* :data:`sdk.keys.REFERENCE_LOGPROBS`, float ``[B, T]``: a frozen reference policy's
  :func:`token_logprobs` of the same tokens (entry 0 unused);
* :data:`sdk.keys.REWARD`, float ``[B]``: a scalar reward per sequence.

**Preference pairs** are two consecutive rows: row ``2p`` is pair ``p``'s preferred (chosen)
response and row ``2p + 1`` its dispreferred (rejected) one to the same prompt, so a batch of
``P`` pairs has ``2P`` rows (:func:`pairs`). A loader keeps a pair together by making each
dataset item one pair and flattening it in its ``collate_fn`` (so under DDP a pair never
straddles two ranks); a pair objective's ``Loss.per_sample`` gives each of a pair's two rows the
pair's loss, so its mean over the rows is the mean over the pairs.

:func:`read` returns the shifted, checked :class:`Tokens` (targets, their log-probabilities in
float32 and the mask, all ``[B, T - 1]``); a wrong shape or dtype raises
:class:`sdk.ShapeError` naming the plugin, the field and the shapes, before any math.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from sdk import keys
from sdk.errors import RequirementError, ShapeError
from sdk.types import Batch, Views, _shape


def token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """``log softmax(logits[:, t - 1])[ids[:, t]]`` for ``t = 1 .. T - 1``, float32 ``[B, T - 1]``:
    each token's log-probability under the model that produced ``logits`` ``[B, T, V]``. A frozen
    reference's values, padded with a leading column, are :data:`sdk.keys.REFERENCE_LOGPROBS`."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


@attrs.frozen(kw_only=True)
class Tokens:
    """The targets of a batch of sequences, shifted to the scores that predict them.

    ``logits`` ``[B, T - 1, V]`` (as given, for objectives that need the whole distribution);
    ``targets`` long ``[B, T - 1]`` (tokens ``1 .. T - 1``); ``logprobs`` float32 ``[B, T - 1]``
    (:func:`token_logprobs`); ``mask`` bool ``[B, T - 1]``: which targets count."""

    logits: Tensor
    targets: Tensor
    logprobs: Tensor
    mask: Tensor

    @property
    def count(self) -> Tensor:
        """How many targets count in each sequence, float ``[B]``."""
        return self.mask.sum(1, dtype=torch.float32)

    def sum(self, values: Tensor) -> Tensor:
        """``sum_t mask * values`` per sequence ``[B]``; masked entries are selected out, not
        multiplied, so whatever they hold never reaches the sum."""
        return torch.where(self.mask, values, torch.zeros((), dtype=values.dtype,
                                                          device=values.device)).sum(1)

    def mean(self, values: Tensor) -> Tensor:
        """The length-normalised ``sum / count`` per sequence ``[B]`` (0 for a sequence with no
        counted target)."""
        return self.sum(values) / self.count.clamp_min(1)

    def token_mean(self, values: Tensor) -> Tensor:
        """The mean of ``values`` over every counted target of the batch (0 when none counts):
        SFT's token-level average."""
        return self.sum(values).sum() / self.count.sum().clamp_min(1)


def _check_ids(owner: str, ids: Tensor, vocab: int) -> None:
    """Raise naming ``owner`` when an id lies outside ``[0, vocab)`` (a host sync: called only
    once torch refused the ids, to say why)."""
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= vocab:
        raise ShapeError(f"{owner}: extras[{keys.TOKEN_IDS!r}] must hold token ids in [0, {vocab}), "
                         f"got ids in [{low}, {high}]")


def read(owner: str, views: Views, batch: Batch) -> Tokens:
    """The checked :class:`Tokens` of ``Views.logits`` ``[B, T, V]`` against
    ``Batch.extras[TOKEN_IDS]`` and ``[TOKEN_MASK]``; ``owner`` (e.g. ``"objective 'asft'"``)
    is named in every error."""
    logits = views.logits
    if logits is None:
        raise RequirementError(f"{owner}: needs Views.logits [B, T, V] (a sequence model's "
                               f"next-token scores), got None")
    if logits.dim() != 3:
        raise ShapeError(f"{owner}: Views.logits must be a sequence model's [B, T, V], got "
                         f"{_shape(logits)}")
    ids = batch.extras.get(keys.TOKEN_IDS)
    if not isinstance(ids, Tensor):
        raise RequirementError(f"{owner}: needs Batch.extras[{keys.TOKEN_IDS!r}] (long [B, T])")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.shape != logits.shape[:2]:
        raise ShapeError(f"{owner}: extras[{keys.TOKEN_IDS!r}] must be integer ids "
                         f"{_shape(logits[..., 0])} matching Views.logits {_shape(logits)}, got "
                         f"{ids.dtype} {_shape(ids)}")
    if ids.shape[1] < 2:
        raise ShapeError(f"{owner}: extras[{keys.TOKEN_IDS!r}] must hold sequences of at least 2 "
                         f"tokens (token 0 is never predicted), got {_shape(ids)}")
    mask = batch.extras.get(keys.TOKEN_MASK)
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    elif not isinstance(mask, Tensor) or mask.shape != ids.shape:
        got = _shape(mask) if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(f"{owner}: extras[{keys.TOKEN_MASK!r}] must have the shape of "
                         f"extras[{keys.TOKEN_IDS!r}] {_shape(ids)}, got {got}")
    else:
        mask = mask.bool()  # nonzero counts
    ids = ids.long()
    try:
        logprobs = token_logprobs(logits, ids)
    except (RuntimeError, IndexError):
        _check_ids(owner, ids, logits.shape[-1])
        raise
    return Tokens(logits=logits[:, :-1], targets=ids[:, 1:], logprobs=logprobs, mask=mask[:, 1:])


def extra(owner: str, batch: Batch, key: str, shape: tuple[int, ...]) -> Tensor:
    """``Batch.extras[key]`` as a floating tensor of ``shape``, or an error naming ``owner``."""
    value: Any = batch.extras.get(key)
    if not isinstance(value, Tensor):
        raise RequirementError(f"{owner}: needs Batch.extras[{key!r}] of shape {list(shape)}")
    if tuple(value.shape) != shape or not value.is_floating_point():
        raise ShapeError(f"{owner}: extras[{key!r}] must be floating {list(shape)}, got "
                         f"{value.dtype} {_shape(value)}")
    return value


def reference_logprobs(owner: str, batch: Batch, tokens: Tokens) -> Tensor:
    """The reference policy's log-probabilities of ``tokens``' targets, float32 ``[B, T - 1]``
    (:data:`sdk.keys.REFERENCE_LOGPROBS` without its unused first column)."""
    b, t = tokens.targets.shape
    return extra(owner, batch, keys.REFERENCE_LOGPROBS, (b, t + 1))[:, 1:].float()


def pairs(owner: str, values: Tensor) -> tuple[Tensor, Tensor]:
    """``(chosen, rejected)``: rows ``0, 2, 4, ...`` and ``1, 3, 5, ...`` of per-sequence
    ``values`` ``[2P, ...]``; an odd number of rows is an error naming ``owner``."""
    if values.shape[0] % 2:
        raise ShapeError(f"{owner}: preference pairs are consecutive rows (chosen, rejected), so "
                         f"the batch needs an even number of sequences, got {values.shape[0]}")
    return values[0::2], values[1::2]


def per_pair_rows(loss: Tensor) -> Tensor:
    """A pair loss ``[P]`` as per-row losses ``[2P]``: the pair's loss on each of its two rows."""
    return loss.repeat_interleave(2)
