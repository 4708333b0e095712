"""MCL: ELECTRA's discriminator taught by several self-supervision courses. Besides replaced
token detection (RTD), a sequence is corrupted by swapping tokens between positions (swapped
token detection) or by inserting tokens (inserted token detection), and the discriminator
labels every token as original or corrupted with a per-token binary cross-entropy.

Chen, Huang, Zhang, Guo, Ling, Huang, Wei, Deng and Zhang, "Pre-training Language Model as a
Multi-perspective Course Learner", Findings of ACL 2023 (arXiv:2305.03981); ELECTRA: Clark,
Luong, Le and Manning, ICLR 2020 (arXiv:2003.10555).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Ge, Interval
from torch import Tensor

from sdk import keys
from sdk.card import Card
from sdk.errors import ConfigError, ShapeError
from sdk.hookspecs import hookimpl
from sdk.interfaces import Objective, Transform
from sdk.types import Batch, Loss, Views

NAME = "multi_course_electra"
ORIGINAL, REPLACED, SWAPPED, INSERTED = 0, 1, 2, 3
COURSES = {"replaced": REPLACED, "swapped": SWAPPED, "inserted": INSERTED}


def _rand(shape, generator: torch.Generator | None, device) -> Tensor:
    if generator is not None:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)
    return torch.rand(shape, device=device)


def _randint(high: int, shape, generator: torch.Generator | None, device) -> Tensor:
    if generator is not None:
        return torch.randint(high, shape, generator=generator, device=generator.device).to(device)
    return torch.randint(high, shape, device=device)


def select_positions(counted: Tensor, rate: float, *, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(selected [B, T] bool, order [B, T], n [B])``: ``n_b = round(rate * counted_b.sum())``
    counted positions of each row chosen uniformly; ``order`` lists each row's positions with the
    selected ones first, in random order."""
    u = _rand(counted.shape, generator, counted.device)
    order = torch.argsort(torch.where(counted, u, 2.0), dim=1)
    n = torch.round(rate * counted.sum(1).to(torch.float32)).long()
    rank = torch.argsort(order, dim=1)
    return rank < n[:, None], order, n


def replace_tokens(ids: Tensor, selected: Tensor, vocab_size: int, *,
                   generator: torch.Generator | None = None) -> Tensor:
    """RTD's corruption with a uniform proposal: every selected token is redrawn from the whole
    vocabulary (it may come back unchanged, and is then labelled original, as in ELECTRA)."""
    proposal = _randint(vocab_size, ids.shape, generator, ids.device)
    return torch.where(selected, proposal, ids)


def swap_tokens(ids: Tensor, order: Tensor, n: Tensor) -> Tensor:
    """STD's corruption: the selected positions, taken in their random ``order``, swap tokens in
    pairs (first with second, third with fourth, ...; an odd last one stays)."""
    rank = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    partner = rank ^ 1
    partner = torch.where((rank < n[:, None]) & (partner < n[:, None]), partner, rank)
    perm = torch.empty_like(order).scatter_(1, order, order.gather(1, partner))
    return ids.gather(1, perm)


def insert_tokens(ids: Tensor, counted: Tensor, selected: Tensor, vocab_size: int, *,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ITD's corruption: a token drawn uniformly from the vocabulary is inserted before every
    selected position; later tokens move right and those pushed past ``T`` fall off.
    Returns ``(ids, counted, inserted)``, all ``[B, T]`` in the new layout."""
    b, t = ids.shape
    shift = selected.long().cumsum(1)  # insertions at or before each original position
    rows = torch.arange(b, device=ids.device)[:, None].expand(b, t)
    pos = torch.arange(t, device=ids.device)[None, :] + shift
    out = torch.zeros(b, 2 * t + 1, dtype=ids.dtype, device=ids.device)
    keep = torch.zeros(b, 2 * t + 1, dtype=torch.bool, device=ids.device)
    flag = torch.zeros(b, 2 * t + 1, dtype=torch.bool, device=ids.device)
    out[rows, pos] = ids
    keep[rows, pos] = counted
    at = torch.where(selected, pos - 1, 2 * t)  # unselected positions write a spare last cell
    out[rows, at] = _randint(vocab_size, (b, t), generator, ids.device)
    keep[rows, at] = True
    flag[rows, at] = True
    return out[:, :t], keep[:, :t], flag[:, :t]


def _token_inputs(owner: str, ids, mask, *, vocab_size: int | None = None) -> Tensor:
    if (not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point()
            or ids.dtype == torch.bool):
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ShapeError(f"{owner}: the token ids (Batch.extras[{keys.TOKEN_IDS!r}], else x) must "
                         f"be integer [B, T], got {got}")
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(f"{owner}: Batch.extras[{keys.TOKEN_MASK!r}] must be [B, T] = "
                         f"{list(ids.shape)} like the tokens, got {got}")
    return mask.bool() if mask.dtype == torch.bool else mask != 0


class MultiCourseCorruption(Transform):
    """``(x, batch) -> (corrupted ids, batch + extras)``: the token ids long ``[B, T]`` are
    ``Batch.extras[keys.TOKEN_IDS]`` where the batch holds them (``x``, then only the batch's
    rows, is what the loader gave beside them), else ``x`` itself; the positions that count are
    ``Batch.extras[keys.TOKEN_MASK]`` (all when absent). The corrupted ids replace ``x`` for the
    discriminator. Each row takes
    one of ``courses`` at random and corrupts ``round(rate * counted)`` of its counted positions:
    ``replaced`` (:func:`replace_tokens`), ``swapped`` (:func:`swap_tokens`) or ``inserted``
    (:func:`insert_tokens`). ``Batch.extras`` gains :data:`~sdk.keys.TOKEN_IDS` (the corrupted
    ids), :data:`~sdk.keys.TOKEN_MASK` (the counted positions of the corrupted layout),
    :data:`~sdk.keys.ORIGINAL_TOKEN_IDS` and :data:`~sdk.keys.CORRUPTION_LABELS` (0 where the
    token equals the original token at that place, else the course's code 1, 2 or 3)."""

    def __init__(self, vocab_size: Annotated[int, Ge(2)] = 100,
                 rate: Annotated[float, Interval(gt=0, lt=1)] = 0.15,
                 courses: tuple[str, ...] | list[str] = ("replaced", "swapped", "inserted")):
        super().__init__()
        courses = tuple(courses)
        unknown = [c for c in courses if c not in COURSES]
        if not courses or unknown or len(set(courses)) != len(courses):
            raise ConfigError(f"transform {NAME!r}: courses must be distinct names among "
                              f"{sorted(COURSES)}, got {list(courses)}", param="courses")
        self.vocab_size, self.rate, self.courses = vocab_size, rate, courses
        self.register_buffer("codes", torch.tensor([COURSES[c] for c in courses]), persistent=False)

    def forward(self, x: Tensor, batch: Batch) -> tuple[Tensor, Batch]:
        owner = f"transform {NAME!r}"
        ids = batch.extras.get(keys.TOKEN_IDS, x)
        counted = _token_inputs(owner, ids, batch.extras.get(keys.TOKEN_MASK))
        if ids.shape[0] != x.shape[0]:
            raise ShapeError(f"{owner}: Batch.extras[{keys.TOKEN_IDS!r}] has {ids.shape[0]} rows, "
                             f"x has {x.shape[0]}")
        selected, order, n = select_positions(counted, self.rate)
        course = self.codes[_randint(len(self.courses), (x.shape[0],), None, x.device)][:, None]
        replaced = replace_tokens(ids, selected, self.vocab_size)
        swapped = swap_tokens(ids, order, n)
        inserted, inserted_counted, flag = insert_tokens(ids, counted, selected, self.vocab_size)
        out = torch.where(course == REPLACED, replaced,
                          torch.where(course == SWAPPED, swapped, inserted))
        mask = torch.where(course == INSERTED, inserted_counted, counted)
        changed = torch.where(course == INSERTED, flag, out != ids)
        labels = torch.where(changed, course.expand_as(out), torch.zeros_like(out))
        extras = {**batch.extras, keys.TOKEN_IDS: out, keys.TOKEN_MASK: mask,
                  keys.ORIGINAL_TOKEN_IDS: ids, keys.CORRUPTION_LABELS: labels}
        return out, batch.evolve(extras=extras)

    def example_inputs(self, batch_size: int, generator: torch.Generator):
        ids = torch.randint(self.vocab_size, (batch_size, 12), generator=generator)
        return ids, Batch(index=torch.arange(batch_size), extras={keys.TOKEN_IDS: ids})


def detection_loss(logits: Tensor, labels: Tensor, counted: Tensor) -> Tensor:
    """``[B]``: per sequence, ``sum_t m_t BCE(s_t, [c_t != 0]) / max(1, sum_t m_t)`` for the
    discriminator's logits ``s [B, T]``, corruption labels ``c`` and counted positions ``m``."""
    bce = F.binary_cross_entropy_with_logits(logits, (labels != ORIGINAL).to(logits.dtype),
                                             reduction="none")
    m = counted.to(logits.dtype)
    return torch.where(counted, bce, torch.zeros_like(bce)).sum(1) / m.sum(1).clamp_min(1)


class MultiCourseDetection(Objective):
    """The discriminator's per-token logits ``Views.extras[keys.DETECTION_LOGITS]`` ``[B, T]`` on
    the corrupted ids of the ``multi_course_electra`` transform, judged against its
    :data:`~sdk.keys.CORRUPTION_LABELS` on the positions of :data:`~sdk.keys.TOKEN_MASK`
    (:func:`detection_loss`), scaled by ``weight`` (ELECTRA's discriminator weight
    ``lambda = 50``, which MCL keeps). A position outside the mask enters neither value nor
    gradient. Logs the detection accuracy of each course on its corrupted tokens."""

    requires = {"extras": (keys.DETECTION_LOGITS, keys.CORRUPTION_LABELS, keys.TOKEN_MASK)}
    batch_coupled = False

    def __init__(self, weight: Annotated[float, Interval(gt=0)] = 50.0):
        super().__init__()
        self.weight = weight

    def forward(self, views: Views, batch: Batch) -> Loss:
        owner = f"objective {NAME!r}"
        logits = views.extras[keys.DETECTION_LOGITS]
        labels, mask = batch.extras[keys.CORRUPTION_LABELS], batch.extras[keys.TOKEN_MASK]
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2:
            got = (f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, Tensor)
                   else type(logits).__name__)
            raise ShapeError(f"{owner}: Views.extras[{keys.DETECTION_LOGITS!r}] must be floating "
                             f"[B, T], got {got}")
        if (not isinstance(labels, Tensor) or labels.is_floating_point()
                or labels.shape != logits.shape):
            got = (f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, Tensor)
                   else type(labels).__name__)
            raise ShapeError(f"{owner}: Batch.extras[{keys.CORRUPTION_LABELS!r}] must be integer "
                             f"{list(logits.shape)} like the logits, got {got}")
        counted = _token_inputs(owner, labels, mask)
        per_sample = self.weight * detection_loss(logits, labels, counted)
        hit = (logits > 0) == (labels != ORIGINAL)
        logs = {}
        for name, code in COURSES.items():
            on = (labels == code) & counted
            logs[f"{name}_accuracy"] = ((hit & on).sum() / on.sum().clamp_min(1)).detach()
        return Loss(value=per_sample.mean(), per_sample=per_sample, logs=logs)

    def example_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Views, Batch]:
        ids = torch.randint(30, (batch_size, 12), generator=generator)
        _, batch = MultiCourseCorruption(vocab_size=30, rate=0.3)(ids, Batch(index=torch.arange(batch_size)))
        logits = torch.randn(batch_size, 12, generator=generator).requires_grad_()
        pooled = torch.randn(batch_size, 8, generator=generator)  # the discriminator's sequence embedding
        return Views(embeddings=(pooled,), extras={keys.DETECTION_LOGITS: logits}), batch


_PAPER = "arXiv:2305.03981"
_TITLE = "Pre-training Language Model as a Multi-perspective Course Learner (MCL)"

TRANSFORM_CARD = Card(
    name=NAME, kind="transform", title=_TITLE, paper=_PAPER,
    summary="Corrupts token sequences for MCL's three self-supervision courses: each row is "
            "replaced, swapped or inserted at a rate of its counted tokens, with per-token labels "
            "of what changed.",
    formula="n = round(rate * sum m); replaced: x'_t ~ U(vocab) on the n chosen positions; "
            "swapped: the chosen positions swap tokens in random pairs; inserted: a U(vocab) token "
            "before each chosen position, the rest shifted right and cut at T; label_t = course "
            "code where x'_t differs from the original at t (inserted: where a token was "
            "inserted), else 0",
    left_out="From the abstract and the authors' model card only (the method section was not "
             "reachable here): the course names and that each is a token-level detection task "
             "are confirmed; how MCL samples the replaced and inserted tokens (ELECTRA's "
             "generator, an MLM trained alongside) is not here: proposals are uniform over the "
             "vocabulary, so the generator and its masked-language-model loss are left to the "
             "user. The rate 0.15 is the model card's masking rate for RTD; that STD and ITD "
             "corrupt at the same rate is not checked; one course per row (drawn at random) "
             "rather than all three on every sequence is this transform's choice.",
)

CARD = Card(
    name=NAME, kind="objective", title=_TITLE, paper=_PAPER,
    summary="The discriminator's per-token detection loss of MCL's self-supervision courses "
            "(replaced, swapped and inserted token detection): binary cross-entropy of each "
            "counted token's logit against whether it was corrupted.",
    formula="L_b = lambda * sum_t m_bt BCE(s_bt, [c_bt != 0]) / sum_t m_bt, lambda = 50; "
            "L = mean_b L_b",
    left_out="The two self-correction courses (the generator relearning from the tokens the "
             "discriminator got wrong, the 'correction notebook') and the course-soups weight "
             "averaging need the generator and are not here; they are known from the abstract "
             "only. ELECTRA normalises by all tokens of the batch; here each sequence by its own "
             "counted tokens (equal when all rows count alike), so the loss is per sample. The "
             "weight 50 is ELECTRA's; MCL's own value was not checked.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MultiCourseCorruption, card=TRANSFORM_CARD)
    registry.add(MultiCourseDetection, card=CARD)
